"""Conversion of every supported family (tiny random-weight configs, no downloads), decoding, save/load."""
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import dijiang
from dijiang.attention import gate_summary
from dijiang.cache import DiJiangCache, DiJiangStateLayer
from dijiang.conversion import iter_dijiang_layers
from dijiang.fast_decode import supports_fast_decode
from dijiang.feature_maps import HedgehogFeatureMap
from dijiang.hf_compat import cache_keyword, output_cache
from dijiang.train import TrainConfig, build_optimizer, new_parameter_ids
from helpers import FAMILIES, VOCAB, tiny_model

SETTINGS = {"pure": dict(), "window": dict(window=4), "official": dijiang.DiJiangSettings.official(),
            "hedgehog": dict(feature_map="hedgehog", window=4), "sinks": dict(window=4, sinks=2),
            "gate": dict(window=4, decay_gate=True)}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def incremental_logits(model, ids, prefill: int, mask=None):
    """Prefill `prefill` tokens, then feed the rest one at a time through the cache."""
    keyword = cache_keyword(model.forward)  # past_key_values up to transformers 5.23, cache from 5.24
    out = model(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(prefill, ids.shape[1]):
        step_mask = None if mask is None else mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=step_mask, use_cache=True, **{keyword: cache})
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(SETTINGS))
def test_decode_equals_prefill(family, kind):
    model = dijiang.convert(tiny_model(family), SETTINGS[kind])
    ids = torch.randint(3, VOCAB, (2, 13))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        stepped, cache = incremental_logits(model, ids, prefill=5)
    assert full.shape == (2, 13, VOCAB) and torch.isfinite(full).all()
    assert isinstance(cache, DiJiangCache)
    assert rel_err(stepped, full) < 1e-5


def greedy_recompute(model, ids, new_tokens: int):
    """Greedy decoding the slow way: the whole sequence through the model, no cache, for every new token."""
    for _ in range(new_tokens):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def greedy_generate(model, ids, new_tokens: int):
    """HF generate with its cache (ours after conversion); eos off, so that every new token is compared."""
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                           eos_token_id=None, pad_token_id=0)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_greedy_recompute_and_survives_reload(tmp_path, family):
    """transformers 5.24 renamed the cache argument and generate() silently decoded without the state."""
    model = dijiang.convert(tiny_model(family, seed=2))
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        expected = greedy_recompute(model, ids, 12)
        assert torch.equal(greedy_generate(model, ids, 12), expected)
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(model)
        assert torch.equal(greedy_generate(loaded, ids, 12), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_converts_every_attention_layer_and_keeps_pretrained_weights(family):
    teacher = tiny_model(family)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = dijiang.convert(teacher)
    layers = list(iter_dijiang_layers(model))
    assert len(layers) == 3
    after = model.state_dict()
    for key, value in before.items():  # every pretrained tensor survives under its original name
        assert torch.equal(after[key], value), key
    new_keys = set(after) - set(before)
    assert new_keys and all(".feature_map." in k or "decay_logit" in k for k in new_keys)
    assert model.config.model_type == f"dijiang_{family}"


def test_hybrid_layers_keep_softmax_and_cache_mixes_kinds():
    model = dijiang.convert(tiny_model("llama"), layers=[0, 2])
    assert [m.layer_idx for _, m in iter_dijiang_layers(model)] == [0, 2]
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        stepped, cache = incremental_logits(model, ids, prefill=4)
    assert isinstance(cache.layers[0], DiJiangStateLayer) and not isinstance(cache.layers[1], DiJiangStateLayer)
    assert cache.layers[1].keys.shape[-2] == 9  # the softmax layer grows its KV cache
    assert rel_err(stepped, full) < 1e-5


@pytest.mark.parametrize("kind", ["pure", "window"])
def test_converted_state_does_not_grow_with_context(kind):
    model = dijiang.convert(tiny_model("llama"), SETTINGS[kind])
    sizes = []
    for length in (8, 40, 120):
        with torch.no_grad():
            cache = output_cache(model(torch.randint(3, VOCAB, (1, length)), use_cache=True))
        sizes.append(cache.state_bytes())
    assert sizes[0] > 0 and sizes[0] == sizes[1] == sizes[2]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", ["pure", "window"])
def test_batched_left_padded_generation_equals_single(family, kind):
    model = dijiang.convert(tiny_model(family, seed=1), SETTINGS[kind])
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (7, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for row, prompt in enumerate(prompts):
            single = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[row, width:], single[0, len(prompt):])


def test_left_padding_gives_real_tokens_unpadded_logits():
    model = dijiang.convert(tiny_model("llama"), dict(window=4))
    prompt = torch.randint(3, VOCAB, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(prompt).logits
        with_pad = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    assert rel_err(with_pad, alone) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_identical(tmp_path, family):
    model = dijiang.convert(tiny_model(family), dict(window=4, num_features=32))
    with torch.no_grad():  # make the new parameters differ from their init, so the reload must restore them
        for _, layer in iter_dijiang_layers(model):
            for p in layer.new_parameters():
                p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True)
    model = transformers.BertLMHeadModel(config)
    with pytest.raises(ValueError, match="supported: .*llama"):
        dijiang.convert(model)


def test_bad_inputs():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        dijiang.convert(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        dijiang.convert(tiny_model("llama"), layers=[5])
    with pytest.raises(ValueError, match="unknown DiJiang settings"):
        dijiang.convert(tiny_model("llama"), dict(windw=3))
    with pytest.raises(ValueError, match="unknown feature map"):
        dijiang.convert(tiny_model("llama"), dict(feature_map="nope"))
    converted = dijiang.convert(tiny_model("llama"))
    with pytest.raises(ValueError, match="already converted"):
        dijiang.convert(converted)
    with pytest.raises(FileNotFoundError):
        dijiang.load_pretrained("./no/such/dir")


def test_training_mode_forward_needs_no_cache_flags():
    model = dijiang.convert(tiny_model("llama")).train()
    assert model.config.use_cache
    ids = torch.randint(3, VOCAB, (2, 10))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["pure", "window"])
def test_checkpointed_attention_gives_the_same_gradients(kind):
    ids = torch.randint(3, VOCAB, (2, 12))
    grads = []
    for checkpoint in (False, True):
        model = dijiang.convert(tiny_model("llama"), {**SETTINGS[kind], "checkpoint": checkpoint}).train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def test_learned_projection_trains_and_round_trips(tmp_path):
    model = dijiang.convert(tiny_model("llama"), dict(window=4, learn_projection=True)).train()
    layer = next(layer for _, layer in iter_dijiang_layers(model))
    projection = layer.feature_map.projection
    assert isinstance(projection, torch.nn.Parameter) and projection.dtype == torch.float32
    assert any(p is projection for p in layer.new_parameters())
    ids = torch.randint(3, VOCAB, (2, 10))
    model(ids, labels=ids).loss.backward()
    assert projection.grad is not None and projection.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        projection.add_(0.05 * torch.randn_like(projection))
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    half = dijiang.convert(tiny_model("llama"), dict(learn_projection=True)).to(torch.bfloat16)
    assert next(layer for _, layer in iter_dijiang_layers(half)).feature_map.projection.dtype == torch.float32
    with pytest.raises(ValueError, match="no projection"):
        dijiang.convert(tiny_model("llama"), dict(feature_map="elu", learn_projection=True))


@pytest.mark.parametrize("window", [0, 4])
def test_feature_transform_starts_as_identity_trains_and_round_trips(tmp_path, window):
    ids = torch.randint(3, VOCAB, (2, 13))
    plain = dijiang.convert(tiny_model("llama"), dict(window=window)).eval()
    model = dijiang.convert(tiny_model("llama"), dict(window=window, feature_transform=True)).train()
    layer = next(layer for _, layer in iter_dijiang_layers(model))
    transform = layer.feature_transform
    assert transform.shape == (layer.num_heads, layer.head_dim, layer.head_dim)
    assert any(p is transform for p in layer.new_parameters())
    model(ids, labels=ids).loss.backward()
    assert transform.grad is not None and transform.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert rel_err(model(ids).logits, plain(ids).logits) < 1e-6  # identity at init
        for _, each in iter_dijiang_layers(model):
            each.feature_transform.add_(0.2 * torch.randn_like(each.feature_transform))
        expected = model(ids, use_cache=False).logits
        stepped, _ = incremental_logits(model, ids, prefill=5)
    assert rel_err(stepped, expected) < 1e-5 and rel_err(expected, plain(ids).logits) > 1e-6  # it acts
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_window_mix_init_sets_the_linear_weight():
    model = dijiang.convert(tiny_model("llama"), dict(window=4, window_mix_init=0.7))
    layer = next(layer for _, layer in iter_dijiang_layers(model))
    assert torch.allclose(torch.nn.functional.softplus(layer.window_mix), torch.full_like(layer.window_mix, 0.7))
    with pytest.raises(ValueError, match="window_mix_init"):
        dijiang.convert(tiny_model("llama"), dict(window=4, window_mix_init=0.0))


def hedgehog_maps(model):
    """(query map, key map) of every converted layer."""
    return [(layer.feature_map, layer.key_feature_map) for _, layer in iter_dijiang_layers(model)]


@pytest.mark.parametrize("window", [0, 4])
def test_hedgehog_layer_forms_agree_in_outputs_and_map_gradients(window):
    ids = torch.randint(3, VOCAB, (2, 13))
    runs = {}
    for mode in ("parallel", "chunk", "recurrent"):
        settings = dict(feature_map="hedgehog", window=window, mode=mode, chunk_size=4)
        model = dijiang.convert(tiny_model("llama"), settings).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = [fm.weight.grad for maps in hedgehog_maps(model) for fm in maps]
        runs[mode] = (out.logits.detach(), grads)
    logits_ref, grads_ref = runs["parallel"]
    assert all(g.abs().sum() > 0 for g in grads_ref)  # both maps of every layer train
    for mode in ("chunk", "recurrent"):
        logits, grads = runs[mode]
        assert rel_err(logits, logits_ref) < 1e-5, mode
        assert all(rel_err(g, g0) < 1e-5 for g, g0 in zip(grads, grads_ref)), mode


def test_hedgehog_maps_are_new_parameters_and_fuse_where_a_normaliser_absorbs_their_scale():
    model = dijiang.convert(tiny_model("llama"), dict(feature_map="hedgehog"))
    new_ids = new_parameter_ids(model)
    optimizer = build_optimizer(model.named_parameters(), new_ids, TrainConfig(lr=1e-5, new_lr=3e-2))
    peak_lr = {id(p): group["peak_lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(peak_lr[id(fm.weight)] == 3e-2 for maps in hedgehog_maps(model) for fm in maps)
    for (_, layer), (query_map, key_map) in zip(iter_dijiang_layers(model), hedgehog_maps(model)):
        assert isinstance(query_map, HedgehogFeatureMap) and isinstance(key_map, HedgehogFeatureMap)
        assert query_map.num_features == 2 * 16 and query_map.weight is not key_map.weight
        assert torch.equal(query_map.weight, key_map.weight)  # one init, trained apart
        assert {id(query_map.weight), id(key_map.weight)} <= new_ids
        assert layer.feature_map_fuses()  # pure and normalised: the chunk kernel on its log-features
    for settings, fuses in ((dict(window=4), True), (dict(normalize=False), False)):  # an unnormalised sum does not
        layers = iter_dijiang_layers(dijiang.convert(tiny_model("llama"), dict(settings, feature_map="hedgehog")))
        assert all(layer.feature_map_fuses() == fuses for _, layer in layers)
    plain = next(layer for _, layer in iter_dijiang_layers(dijiang.convert(tiny_model("llama"))))
    assert plain.feature_map_fuses() and plain.key_feature_map is None
    assert supports_fast_decode(model)[0]  # its own query and key maps (tests/test_fast_decode.py)


def test_mix_lr_puts_the_branch_weights_in_their_own_group_and_only_then():
    model = dijiang.convert(tiny_model("llama"), dict(window=4))
    new_ids = new_parameter_ids(model)
    mixes = {id(layer.window_mix) for _, layer in iter_dijiang_layers(model)}
    assert mixes and mixes <= new_ids
    optimizer = build_optimizer(model.named_parameters(), new_ids, TrainConfig(lr=1e-5, new_lr=1e-3, mix_lr=2e-2))
    peak_lr = {id(p): group["peak_lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(peak_lr[i] == 2e-2 for i in mixes)
    assert all(peak_lr[i] == 1e-3 for i in new_ids - mixes) and len(new_ids - mixes) > 0
    mix_groups = [g for g in optimizer.param_groups if g["name"].startswith("mix")]
    assert [g["name"] for g in mix_groups] == ["mix_vector"] and mix_groups[0]["weight_decay"] == 0.0
    plain = build_optimizer(model.named_parameters(), new_ids, TrainConfig(lr=1e-5, new_lr=1e-3))
    assert len(plain.param_groups) == 4  # what a checkpoint without mix_lr resumes
    assert all(g["peak_lr"] == 1e-3 for g in plain.param_groups for p in g["params"] if id(p) in mixes)


def test_hedgehog_round_trips_through_save_and_from_pretrained(tmp_path):
    model = dijiang.convert(tiny_model("llama"), dict(feature_map="hedgehog", window=4)).eval()
    with torch.no_grad():  # trained-looking maps, query and key apart, so the reload must restore both
        for maps in hedgehog_maps(model):
            for fm in maps:
                fm.weight.add_(0.1 * torch.randn_like(fm.weight))
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.dijiang["feature_map"] == "hedgehog"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    for maps, loaded_maps in zip(hedgehog_maps(model), hedgehog_maps(loaded)):
        for fm, loaded_fm in zip(maps, loaded_maps):
            assert torch.equal(fm.weight, loaded_fm.weight)
    half = dijiang.convert(tiny_model("llama"), dict(feature_map="hedgehog")).to(torch.bfloat16)
    assert all(fm.weight.dtype == torch.float32 for maps in hedgehog_maps(half) for fm in maps)


def test_sinks_round_trip(tmp_path):
    model = dijiang.convert(tiny_model("llama", seed=3), dict(window=4, sinks=2)).eval()
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert all(layer.settings.sinks == 2 for _, layer in iter_dijiang_layers(loaded))
        assert torch.equal(loaded(ids, use_cache=False).logits, logits)
        plain = dijiang.convert(tiny_model("llama", seed=3), dict(window=4)).eval()
        # the same weights: the sinks change what a query sees only once the first tokens leave its window
        plain_logits = plain(ids, use_cache=False).logits
        assert torch.equal(plain_logits[:, :4], logits[:, :4])
        assert rel_err(plain_logits[:, 4:], logits[:, 4:]) > 1e-3
    with pytest.raises(ValueError, match="needs a window"):
        dijiang.convert(tiny_model("llama"), dict(sinks=2))
    with pytest.raises(ValueError, match="sinks"):
        dijiang.convert(tiny_model("llama"), dict(window=4, sinks=65))


@pytest.mark.parametrize("window", [4, 0])
def test_decay_gate_starts_as_the_per_head_decay_trains_and_round_trips(tmp_path, window):
    """window 0: the gate in pure DiJiang layers (no softmax part)."""
    ids = torch.randint(3, VOCAB, (2, 20))
    plain = dijiang.convert(tiny_model("llama", seed=4), dict(window=window)).eval()
    gated = dijiang.convert(tiny_model("llama", seed=4), dict(window=window, decay_gate=True)).eval()
    with torch.no_grad():
        assert rel_err(gated(ids, use_cache=False).logits, plain(ids, use_cache=False).logits) < 1e-6  # u = 0
    assert supports_fast_decode(gated)[0]  # tests/test_fast_decode.py decodes it
    gated.train()
    gated(ids, labels=ids, use_cache=False).loss.backward()
    layers = [layer for _, layer in iter_dijiang_layers(gated)]
    assert all(layer.decay_gate.grad is not None and layer.decay_gate.grad.abs().sum() > 0 for layer in layers)
    assert all(any(p is layer.decay_gate for p in layer.new_parameters()) for layer in layers)
    assert gate_summary(layers)["gate_norm_max"] == 0.0  # logged in training: does the gate move at all
    with torch.no_grad():
        for layer in layers:
            layer.decay_gate.normal_(std=0.5)
        norms = torch.stack([layer.decay_gate.norm(dim=-1).max() for layer in layers])
        assert gate_summary(layers)["gate_norm_max"] == pytest.approx(norms.max().item())
        gated.eval()
        logits = gated(ids, use_cache=False).logits
        assert rel_err(logits, plain(ids, use_cache=False).logits) > 1e-4  # the gate now changes the decay
        stepped, _ = incremental_logits(gated, ids, prefill=7)
        assert rel_err(stepped, logits) < 1e-5
        gated.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(ids, use_cache=False).logits, logits)
