"""dijiang.fast_decode: the static decode loop gives model.generate's greedy tokens; sampling is seeded."""
import pytest
import torch

import dijiang
from dijiang.fast_decode import FastDecoder, fast_generate, supports_fast_decode
from dijiang.ops.testing import rel_err
from helpers import VOCAB, left_padded, reference, tiny_model

SETTINGS = {"pure": dict(), "window": dict(window=4), "official": dijiang.DiJiangSettings.official(),
            "norm": dict(stabiliser="norm", normalize=False),
            "transform": dict(window=4, radius="chi", feature_transform=True),
            "sinks": dict(window=4, radius="chi", feature_transform=True, sinks=2),  # recipes/smollm2-135m.yaml's kind
            "hedgehog": dict(feature_map="hedgehog", window=4)}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["pure", "window", "sinks"])
def test_greedy_equals_generate_batch2_left_padded(family, kind):
    model = dijiang.convert(tiny_model(family, seed=1), SETTINGS[kind])
    ids, mask = left_padded()
    expected = reference(model, ids, mask, 12)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=12), expected)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("kind", ["official", "norm"])
def test_greedy_other_families_and_layer_options(family, kind):
    model = dijiang.convert(tiny_model(family, seed=2), SETTINGS[kind])
    ids, mask = left_padded(seed=3)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=10), reference(model, ids, mask, 10))


@pytest.mark.parametrize("window", [0, 4])
def test_feature_transform_folded_into_the_projection(window):
    model = dijiang.convert(tiny_model("llama", seed=1), dict(window=window, feature_transform=True))
    with torch.no_grad():
        for _, layer in dijiang.conversion.iter_dijiang_layers(model):
            layer.feature_transform.add_(0.3 * torch.randn_like(layer.feature_transform))
    assert supports_fast_decode(model)[0]
    ids, mask = left_padded()
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=12), reference(model, ids, mask, 12))


def decoded_and_forward_logits(model, monkeypatch, new_tokens=6):
    """Every decode step's logits from fast_generate, and one forward's over the decoded sequence (positions
    counted from each row's first real token, as generate counts them), [B, new_tokens, V] each. The tiny models'
    greedy tokens hardly depend on some layer options; their logits do."""
    steps = []
    real_select = FastDecoder._select
    monkeypatch.setattr(FastDecoder, "_select", lambda self, logits: steps.append(logits.float()) or
                        real_select(self, logits))
    ids, mask = left_padded()
    out = fast_generate(model, ids, mask, max_new_tokens=new_tokens)
    monkeypatch.undo()
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], out.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    forward = dict(attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)

    def forward_logits():
        with torch.no_grad():
            return model(out, **forward).logits[:, ids.shape[1] - 1:-1].float()

    return torch.stack(steps, dim=1), forward_logits


@pytest.mark.parametrize("window,sinks", [(0, 0), (4, 0), (4, 2)])
def test_hedgehog_maps_decode_like_one_forward(window, sinks, monkeypatch):
    """Hedgehog's learned map, its query and key maps apart (trained-looking), in pure and window layers."""
    model = dijiang.convert(tiny_model("llama", seed=1), dict(feature_map="hedgehog", window=window, sinks=sinks))
    layers = [layer for _, layer in dijiang.conversion.iter_dijiang_layers(model)]
    with torch.no_grad():
        for layer in layers:
            for fm in (layer.feature_map, layer.key_map):
                fm.weight.add_(0.5 * torch.randn_like(fm.weight))
            if window:
                layer.window_mix.fill_(3.0)  # a linear part that counts beside the 4-token window
    assert supports_fast_decode(model)[0]
    decoded, forward_logits = decoded_and_forward_logits(model, monkeypatch)
    logits = forward_logits()
    assert rel_err(decoded, logits) < 1e-4
    with torch.no_grad():  # keys through the query map: a different model, which the decoder must not be
        for layer in layers:
            layer.key_map.weight.copy_(layer.feature_map.weight)
    assert rel_err(forward_logits(), logits) > 1e-3


@pytest.mark.parametrize("window,sinks", [(0, 0), (4, 0), (4, 2)])
def test_data_dependent_decay_decodes_like_one_forward(window, sinks, monkeypatch):
    """decay_gate: each step's decay from its own v, in pure and window layers (the window decode kernel, which
    holds a per-head decay, is not used for them)."""
    model = dijiang.convert(tiny_model("llama", seed=1), dict(window=window, sinks=sinks, decay_gate=True))
    layers = [layer for _, layer in dijiang.conversion.iter_dijiang_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.decay_gate.normal_(std=2.0)  # u = 0 at init would be the per-head decay
            if window:
                layer.window_mix.fill_(3.0)
    assert supports_fast_decode(model)[0]
    decoded, forward_logits = decoded_and_forward_logits(model, monkeypatch)
    logits = forward_logits()
    assert rel_err(decoded, logits) < 1e-4
    with torch.no_grad():
        for layer in layers:
            layer.decay_gate.zero_()
    assert rel_err(forward_logits(), logits) > 1e-3  # the gate matters here (10x the tolerance)


@pytest.mark.parametrize("kind", ["pure", "window"])
def test_hybrid_with_softmax_layers_uses_static_kv(kind):
    model = dijiang.convert(tiny_model("llama", seed=1), SETTINGS[kind], layers=[0, 2])
    ids, mask = left_padded()
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=12), reference(model, ids, mask, 12))
    teacher = tiny_model("qwen3", seed=1)  # unconverted: every layer on the static KV buffer
    assert torch.equal(fast_generate(teacher, ids, mask, max_new_tokens=8), reference(teacher, ids, mask, 8))


def test_eos_padding_and_early_stop_like_generate():
    model = dijiang.convert(tiny_model("llama", seed=1))
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    free = reference(model, ids, None, 12)
    some = [int(free[0, 8]), int(free[1, 7])]  # rows 0 and 1 stop, row 2 probably runs on
    assert torch.equal(fast_generate(model, ids, max_new_tokens=12, eos_token_id=some, pad_token_id=0),
                       reference(model, ids, None, 12, eos_token_id=some))
    every = [int(t) for t in free[:, 6]]  # every row stops at its first token: output is one token long
    out = fast_generate(model, ids, max_new_tokens=12, eos_token_id=every, pad_token_id=0)
    assert torch.equal(out, reference(model, ids, None, 12, eos_token_id=every))
    assert out.shape[1] == 7


def test_sampling_reproducible_by_seed():
    model = dijiang.convert(tiny_model("llama", seed=1), dict(window=4))
    ids, mask = left_padded()
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, eos_token_id=None)
    a = fast_generate(model, ids, mask, seed=3, **kw)
    b = fast_generate(model, ids, mask, seed=3, **kw)
    c = fast_generate(model, ids, mask, seed=4, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, ids.shape[1] + 16) and int(a.max()) < VOCAB
    tiny_p = fast_generate(model, ids, mask, seed=3, **{**kw, "top_p": 1e-6})  # top-p -> greedy
    assert torch.equal(tiny_p, fast_generate(model, ids, mask, max_new_tokens=16, eos_token_id=None))


def test_decoder_is_reused_and_state_is_static():
    model = dijiang.convert(tiny_model("llama", seed=1))
    ids, mask = left_padded()
    fast_generate(model, ids, mask, max_new_tokens=4)
    decoders = list(model._dijiang_fast_decoders.values())
    states = [p.state.data_ptr() for p in decoders[0].plans]
    second = fast_generate(model, ids[:, 1:], mask[:, 1:], max_new_tokens=4)
    assert list(model._dijiang_fast_decoders.values()) == decoders  # same decoder, same buffers
    assert [p.state.data_ptr() for p in decoders[0].plans] == states
    assert torch.equal(second, reference(model, ids[:, 1:], mask[:, 1:], 4))


def test_window_state_through_many_steps_and_prompts():
    """Window hybrids: many steps past the window, a window longer than the prompt (padding leaves the window
    first), and one decoder reused for prompts of other lengths."""
    model = dijiang.convert(tiny_model("llama", seed=4), dict(window=3))
    for lengths, new in (((6, 2), 20), ((5, 5), 9), ((1, 3), 14)):
        ids, mask = left_padded(lengths, seed=new)
        assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=new), reference(model, ids, mask, new))
    long_window = dijiang.convert(tiny_model("llama", seed=4), dict(window=16))
    ids, mask = left_padded((6, 2), seed=5)
    assert torch.equal(fast_generate(long_window, ids, mask, max_new_tokens=24), reference(long_window, ids, mask, 24))


def test_unsupported_family_falls_back_with_a_note():
    model = dijiang.convert(tiny_model("gpt2"))
    ids, mask = left_padded()
    assert not supports_fast_decode(model)[0]
    with pytest.warns(UserWarning, match="falling back to model.generate"):
        out = fast_generate(model, ids, mask, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(out, reference(model, ids, mask, 5))


def test_bad_inputs():
    model = dijiang.convert(tiny_model("llama"))
    with pytest.raises(ValueError, match="temperature"):
        FastDecoder(model, 1, 16, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        FastDecoder(model, 1, 16, top_p=0.0)
    decoder = FastDecoder(model, 2, 16)
    with pytest.raises(ValueError, match="batch size 2"):
        decoder.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="capacity"):
        decoder.generate(torch.ones(2, 10, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        fast_generate(model, torch.ones(4, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["pure", "window", "transform", "sinks", "hedgehog"])
def test_cuda_graph_greedy_equals_generate(kind):
    model = dijiang.convert(tiny_model("llama", seed=1), SETTINGS[kind]).cuda()
    with torch.no_grad():
        for _, layer in dijiang.conversion.iter_dijiang_layers(model):
            if layer.feature_transform is not None:
                layer.feature_transform.add_(0.3 * torch.randn_like(layer.feature_transform))
            if layer.key_feature_map is not None:  # Hedgehog: query and key maps apart
                for fm in (layer.feature_map, layer.key_feature_map):
                    fm.weight.add_(0.3 * torch.randn_like(fm.weight))
    ids, mask = (t.cuda() for t in left_padded())
    expected = reference(model, ids, mask, 12)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=12, compile=False), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sink_layers_decode_on_the_window_kernel(monkeypatch):
    """The shipped recipe's layers (window + sinks) on the ring-buffer kernel on CUDA by default, sinks and all:
    batch 2, a short row that fills its sinks while decoding, greedy tokens equal to generate's."""
    from dijiang import fast_decode

    monkeypatch.delenv("DIJIANG_WINDOW_DECODE_KERNEL", raising=False)
    model = dijiang.convert(tiny_model("llama", seed=1), SETTINGS["sinks"]).cuda()
    ids, mask = (t.cuda() for t in left_padded())
    expected = reference(model, ids, mask, 12)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=12, compile=False), expected)
    decoder = next(iter(model._dijiang_fast_decoders.values()))
    assert all(isinstance(plan.fn, fast_decode._KernelWindowStep) for plan in decoder.plans)
    assert decoder.shared_masks["sink_mask"].all()
