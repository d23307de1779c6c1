"""Head hybrids (DiJiangSettings.full_kv_heads): some key/value heads of a converted layer stay exact softmax."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import dijiang
from dijiang.cache import DiJiangStateLayer
from dijiang.fast_decode import supports_fast_decode
from dijiang.hf_compat import cache_keyword, output_cache
from helpers import VOCAB, tiny_model

WINDOW = dict(window=4, sinks=1)  # tiny llama: 3 layers, 4 query heads on 2 key/value heads, head_dim 16


def head_inputs(model, ids, layer=0):
    """What layer `layer`'s output projection receives: [B, T, heads x head_dim]."""
    seen = {}
    o_proj = model.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return seen["x"]


def test_kept_heads_are_the_teachers_and_the_others_the_window_op():
    teacher = tiny_model("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 24))
    hybrid = dijiang.convert(copy.deepcopy(teacher), {**WINDOW, "full_kv_heads": {0: [1]}}, layers=[0])
    converted = dijiang.convert(copy.deepcopy(teacher), WINDOW, layers=[0])
    exact, mixed, window = (head_inputs(m, ids).unflatten(-1, (4, 16)) for m in (teacher, hybrid, converted))
    # key/value head 1 serves query heads 2 and 3: exact there, the window op's output elsewhere
    assert torch.allclose(mixed[:, :, 2:], exact[:, :, 2:], atol=1e-5)
    assert torch.allclose(mixed[:, :, :2], window[:, :, :2], atol=1e-6)
    assert not torch.allclose(mixed[:, 8:, :2], exact[:, 8:, :2], atol=1e-3)  # past the window the others differ


def test_every_head_exact_is_the_teacher():
    teacher = tiny_model("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 30))
    every = {layer: [0, 1] for layer in range(3)}
    hybrid = dijiang.convert(copy.deepcopy(teacher), {**WINDOW, "full_kv_heads": every})
    with torch.no_grad():
        assert torch.allclose(hybrid(ids).logits, teacher(ids).logits, atol=1e-5)


@pytest.mark.parametrize("settings", [WINDOW, dict()], ids=["window", "pure"])
def test_cached_decode_and_padding_equal_the_full_forward(settings):
    model = dijiang.convert(tiny_model("llama", seed=1), {**settings, "full_kv_heads": {1: [0], 2: [1]}}).eval()
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :12], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(12, 20):
            out = model(ids[:, t:t + 1], use_cache=True, **{cache_keyword(model.forward): cache})
            cache = output_cache(out)
            logits.append(out.logits)
    assert torch.allclose(torch.cat(logits, 1), full, atol=1e-5)
    layer = cache.layers[1]
    assert isinstance(layer, DiJiangStateLayer) and layer.full_keys.shape == (1, 20, 1, 16)
    assert cache.layers[0].full_keys is None  # layer 0 keeps no exact head
    # left padding: a padded row generates what it generates alone
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (9, 5)]
    padded = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    with torch.no_grad():
        batched = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
        for row, prompt in enumerate(prompts):
            alone = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[row, 9:], alone[0, len(prompt):])


def test_exact_heads_cache_grows_and_the_rest_does_not():
    model = dijiang.convert(tiny_model("llama"), {**WINDOW, "full_kv_heads": {2: [0]}}).eval()
    sizes = []
    for length in (8, 40):
        with torch.no_grad():
            cache = output_cache(model(torch.randint(3, VOCAB, (1, length)), use_cache=True))
        sizes.append((cache.layers[0].state_bytes(), cache.layers[2].state_bytes()))
    assert sizes[0][0] == sizes[1][0]  # a plain converted layer: constant
    # layer 2 adds 32 tokens x 1 key/value head x 16 dims x (keys, values) x 4 bytes
    assert sizes[1][1] - sizes[0][1] == 32 * 16 * 2 * 4


def test_save_and_reload_keep_the_exact_heads(tmp_path):
    model = dijiang.convert(tiny_model("llama"), {**WINDOW, "full_kv_heads": {0: [1], 2: [0, 1]}}).eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["dijiang"]["full_kv_heads"] == {"0": [1], "2": [0, 1]}
    assert loaded.model.layers[2].self_attn.full_kv_heads == (0, 1)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    ok, why = supports_fast_decode(loaded)
    assert not ok and "full_kv_heads" in why


def test_gradients_reach_the_exact_heads_projections():
    model = dijiang.convert(tiny_model("llama"), {**WINDOW, "full_kv_heads": {1: [1]}})
    model.train()
    model(torch.randint(3, VOCAB, (2, 16)), labels=torch.randint(3, VOCAB, (2, 16))).loss.backward()
    attention = model.model.layers[1].self_attn
    assert attention.k_proj.weight.grad[16:].abs().sum() > 0  # key/value head 1's rows
    assert attention.window_mix.grad is not None


@pytest.mark.parametrize("heads, message", [
    ({0: [2]}, "has 2 key/value heads"),
    ({0: []}, "distinct"),
    ({0: [1, 1]}, "distinct"),
    ({0: 1}, "list of key/value head"),
    ({"x": [0]}, "layer index"),
    ([0, 1], "must map layer"),
])
def test_bad_full_kv_heads_are_refused(heads, message):
    with pytest.raises(ValueError, match=message):
        dijiang.convert(tiny_model("llama"), {**WINDOW, "full_kv_heads": heads})


def test_full_kv_heads_only_in_converted_layers():
    with pytest.raises(ValueError, match="not converted"):
        dijiang.convert(tiny_model("llama"), {**WINDOW, "full_kv_heads": {1: [0]}}, layers=[0, 2])
    with pytest.raises(ValueError, match="not converted"):
        dijiang.convert(tiny_model("llama"), {**WINDOW, "full_kv_heads": {7: [0]}})


def test_full_kv_heads_on_the_command_line():
    import argparse

    from dijiang.arguments import layer_heads
    from dijiang.conversion import add_settings_arguments, settings_from_args

    assert layer_heads("7:2, 21:0,21:2") == {7: [2], 21: [0, 2]}
    for bad in ("7", "7:x", "-1:0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            layer_heads(bad)
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    settings, _ = settings_from_args(parser.parse_args(["--window", "4", "--full-kv-heads", "2:1,0:0"]))
    assert settings.full_kv_heads == {0: (0,), 2: (1,)}


def test_a_head_hybrid_trains_resumes_and_exports(tmp_path):
    """run_config.json stores the layer keys as strings; resume and export must rebuild the same student."""
    from dijiang.checkpoints import checkpoint_dirs
    from dijiang.export import export_checkpoint
    from dijiang.train import TrainConfig, train
    from helpers import save_tiny_model, write_text_corpus

    model, corpus = save_tiny_model(tmp_path / "model"), write_text_corpus(tmp_path / "corpus")
    values = dict(model=str(model), out=str(tmp_path / "run"), data=[str(corpus)], eval_data=[], tokens="768",
                  block_size=32, batch_size=4, save_every=2, progress=False,
                  attention={"window": 8, "sinks": 1, "full_kv_heads": {1: [0]}})
    train(TrainConfig(**values, max_steps=3))
    assert [d.name for d in checkpoint_dirs(tmp_path / "run")][-1] == "step_00000003"
    summary = train(TrainConfig(**values, resume=True))
    student = summary["model"]
    assert student.model.layers[1].self_attn.full_kv_heads == (0,)
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(tmp_path / "run", tmp_path / "exported"))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ids = torch.randint(3, 50, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, final(ids).logits)
    assert final.model.layers[1].self_attn.full_kv_heads == (0,)
