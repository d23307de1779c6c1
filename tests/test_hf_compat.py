"""The installed transformers against dijiang.hf_compat: a renamed cache argument fails here, not in users' output."""
import inspect

import pytest
import torch
import transformers

import dijiang
from dijiang import hf_compat
from dijiang.cache import DiJiangCache
from dijiang.conversion import decoder_stack, iter_dijiang_layers
from dijiang.hf_compat import DecodeWithoutStateError
from helpers import FAMILIES, VOCAB, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_forward_takes_the_cache_under_a_known_name(family):
    model = tiny_model(family)
    assert hf_compat.cache_keyword(model.forward) in inspect.signature(model.forward).parameters
    assert hf_compat.cache_keyword(decoder_stack(model).forward) in hf_compat.CACHE_ARGUMENT_NAMES


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_modules_get_the_cache_and_outputs_return_it(family):
    """Unconverted: every attention call of a use_cache forward carries a Cache that find_cache sees."""
    model = tiny_model(family)
    adapter = dijiang.adapters.adapter_for(family)
    seen = []
    for _, module in dijiang.conversion.attention_modules(model, adapter):
        module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(hf_compat.find_cache(args, kwargs)),
                                         with_kwargs=True)
    with torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 5)), use_cache=True)
    assert len(seen) == 3 and all(isinstance(cache, transformers.Cache) for cache in seen)
    assert hf_compat.output_cache(out) is seen[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_deprecated_keyword_still_reaches_the_layers():
    """From 5.24 past_key_values= is deprecated, not gone: a caller still using it keeps the recurrent state."""
    model = dijiang.convert(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        cache = hf_compat.output_cache(model(ids[:, :8], use_cache=True))
        last = model(ids[:, 8:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert torch.allclose(last, full, atol=1e-5)


def test_one_token_after_a_prefill_without_the_cache_raises():
    model = dijiang.convert(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        model(ids[:, :8], use_cache=True)
        with pytest.raises(DecodeWithoutStateError, match="position 8"):
            model(ids[:, 8:], position_ids=torch.tensor([[8]]), use_cache=False)
        with pytest.raises(DecodeWithoutStateError, match="mask covers 9 tokens"):
            model(ids[:, 8:], attention_mask=torch.ones(1, 9, dtype=torch.long), use_cache=True)
        with pytest.raises(DecodeWithoutStateError, match="mask covers 9 tokens"):  # a fresh cache holds nothing
            model(ids[:, 8:], attention_mask=torch.ones(1, 9, dtype=torch.long),
                  **{hf_compat.cache_keyword(model.forward): DiJiangCache.for_model(model)})


def test_a_layer_that_does_not_get_the_cache_raises_in_generate():
    """What a future rename looks like from inside: the decoder holds our cache, the layer's call lacks it."""
    model = dijiang.convert(tiny_model("llama"))
    _, layer = next(iter_dijiang_layers(model))

    def drop_cache(module, args, kwargs):
        return args, hf_compat.without_cache(kwargs)

    layer.register_forward_pre_hook(drop_cache, with_kwargs=True)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad(), pytest.raises(DecodeWithoutStateError, match="renamed the cache argument"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    with torch.no_grad():  # without a cache the same model still runs (training, scoring, layer checks)
        assert torch.isfinite(model(ids, use_cache=False).logits).all()
        args, kwargs = _layer_inputs(model, ids)
        assert torch.isfinite(layer(*args, **kwargs)[0]).all()


def _layer_inputs(model, ids):
    """The first converted layer's (args, kwargs) in a no-cache forward, to call it on its own afterwards."""
    _, layer = next(iter_dijiang_layers(model))
    captured = {}

    def keep(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def test_a_decoder_without_a_known_cache_argument_is_named():
    def forward(input_ids=None, attention_mask=None, state=None, use_cache=None):
        return None

    call = hf_compat.DecoderCall(inspect.signature(forward), (), dict(input_ids=torch.ones(1, 3), use_cache=True))
    assert call.cache is None and call.query_length == 3
    with pytest.raises(TypeError, match="needs this release's name for the cache"):
        call.with_changes(cache=object())
    with pytest.raises(TypeError, match="takes none of"):
        hf_compat.cache_keyword(forward)
