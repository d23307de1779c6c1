"""The layer's fused Triton path equals its torch path (GPU only)."""
import pytest
import torch
import transformers

import dijiang
import dijiang.attention  # noqa: F401  (the package imports its modules lazily)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("window,sinks,gate,feature_map,full_kv_heads", [
    (0, 0, False, "dijiang", {}), (0, 0, True, "dijiang", {}), (0, 0, False, "hedgehog", {}),
    (0, 0, True, "hedgehog", {}), (64, 0, False, "dijiang", {}), (60, 4, False, "dijiang", {}),
    (60, 4, True, "dijiang", {}), (60, 4, False, "hedgehog", {}), (60, 4, False, "dijiang", {1: [1]})])
def test_fused_backend_matches_torch_backend_in_a_converted_model(window, sinks, gate, feature_map, full_kv_heads,
                                                                  monkeypatch):
    """window 0: the fused chunk kernel; window 64: the banded softmax kernel + the fused chunk kernel; sinks: the
    band kernel's sink block; gate: a data-dependent decay (per-token decays into the chunk kernel); hedgehog: the
    chunk kernel on the learned map's log-features (m = 128), pure or beside the band; full_kv_heads: a head
    hybrid's exact heads (SDPA under autocast) over the fused window op's output."""
    calls = []
    name = "fused_window_attention" if window else "fused_dijiang_attention"
    real = getattr(dijiang.attention, name)
    monkeypatch.setattr(dijiang.attention, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def no_fallback(*args, **kwargs):
        raise AssertionError("the fused op fell back to the torch path")

    monkeypatch.setattr(dijiang.ops.triton_dijiang, "torch_dijiang_attention", no_fallback)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    base = transformers.LlamaForCausalLM(config).cuda()
    fused = dijiang.convert(base, {"backend": "auto", "window": window, "sinks": sinks, "decay_gate": gate,
                                   "feature_map": feature_map, "full_kv_heads": full_kv_heads})
    if feature_map == "hedgehog":
        with torch.no_grad():  # away from the identity init
            for _, layer in dijiang.conversion.iter_dijiang_layers(fused):
                for fm in (layer.feature_map, layer.key_map):
                    fm.weight.add_(0.1 * torch.randn_like(fm.weight))
    if gate:
        with torch.no_grad():
            for _, layer in dijiang.conversion.iter_dijiang_layers(fused):
                layer.decay_gate.normal_(std=0.1)  # u = 0 at init would be the per-head decay
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_fused = fused(ids, use_cache=False).logits.float()
    out_fused.sum().backward()
    assert len(calls) == config.num_hidden_layers  # the fused path ran in every layer
    grads_fused = [p.grad.clone() for p in fused.parameters() if p.grad is not None]
    fused.zero_grad()
    monkeypatch.undo()
    for _, layer in dijiang.conversion.iter_dijiang_layers(fused):
        layer.settings.backend = "torch"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_torch = fused(ids, use_cache=False).logits.float()
    out_torch.sum().backward()
    grads_torch = [p.grad.clone() for p in fused.parameters() if p.grad is not None]
    assert ((out_fused - out_torch).norm() / out_torch.norm()).item() < 2e-2
    # bf16 products in the kernels against float32 attention math in the torch path; the pure model's worst
    # parameter gradient was 5.7% off on the H100
    for a, b in zip(grads_fused, grads_torch):
        assert ((a - b).norm() / (b.norm() + 1e-12)).item() < 1e-1


def test_hedgehog_prefill_on_the_fused_kernel_then_decode_equals_one_forward():
    """The fused kernel's state for Hedgehog's map is the torch path's / feature_sum: scaled back, it equals the
    torch path's state, and the recurrent decode steps after a fused prefill continue it (float32 model)."""
    from dijiang.hf_compat import cache_keyword, output_cache

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = dijiang.convert(transformers.LlamaForCausalLM(config), {"feature_map": "hedgehog"}).cuda().eval()
    layers = [layer for _, layer in dijiang.conversion.iter_dijiang_layers(model)]
    with torch.no_grad():
        for layer in layers:
            for fm in (layer.feature_map, layer.key_map):
                fm.weight.add_(0.1 * torch.randn_like(fm.weight))
        ids = torch.randint(0, 128, (2, 260), device="cuda")
        whole = model(ids, use_cache=False).logits
        out = model(ids[:, :256], use_cache=True)
        logits, cache = [out.logits], output_cache(out)
        fused_states = [cache.layers[i].state.clone() for i in range(len(layers))]
        for t in range(256, 260):
            out = model(ids[:, t:t + 1], use_cache=True, **{cache_keyword(model.forward): cache})
            logits.append(out.logits)
            cache = output_cache(out)
        for layer in layers:
            layer.settings.backend = "torch"
        torch_states = [output_cache(model(ids[:, :256], use_cache=True)).layers[i].state for i in range(len(layers))]
    for fused_state, torch_state in zip(fused_states, torch_states):
        assert ((fused_state - torch_state).norm() / torch_state.norm()).item() < 1e-2  # a missed scale: 0.5
    stepped = torch.cat(logits, dim=1)
    assert ((stepped - whole).norm() / whole.norm()).item() < 1e-2


@pytest.mark.parametrize("window,sinks,gate,feature_map,decay", [(64, 0, False, "dijiang", True),
                                                                (60, 4, True, "hedgehog", True),
                                                                (60, 4, False, "dijiang", False)])
def test_window_layers_with_a_delta_branch_fused_equal_their_torch_path(window, sinks, gate, feature_map, decay):
    """The band kernel without its linear part beside the delta rule (fla's kernel where it can train, else the
    PyTorch chunk form) against the layer's torch path, in float32: logits and every gradient. In bf16 the
    per-head scalars' gradients (beta's bias, the decay), sums that cancel, were 9-20 % apart on the H200, the
    bf16 band kernel against float32 window math; in float32 every one was within 5e-5. decay False: DeltaNet's
    state; fla's ungated kernel (which trains on Hopper where the gated one is refused) takes only half precision,
    so in float32 both sides run its torch form, and the model is compared once more in bfloat16 (logits), where
    the fused side runs fla's kernel."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = dijiang.convert(transformers.LlamaForCausalLM(config).cuda(), {
        "window": window, "sinks": sinks, "decay_gate": gate, "feature_map": feature_map, "state_update": "delta",
        "state_decay": decay})
    layers = [layer for _, layer in dijiang.conversion.iter_dijiang_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.delta_beta.normal_(std=0.1)
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    results = []
    for backend in ("auto", "torch"):
        for layer in layers:
            layer.settings.backend = backend
        assert layers[0]._can_fuse(*(torch.empty(2, 300, 4, 64, device="cuda"),) * 2, "chunk", None, None) == (
            backend == "auto")
        model.zero_grad()
        logits = model(ids, use_cache=False).logits
        logits.sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fused, fused_grads), (plain, plain_grads) = results
    assert ((fused - plain).norm() / plain.norm()).item() < 1e-4
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert ((fused_grads[name] - grad).norm() / (grad.norm() + 1e-12)).item() < 1e-3, name
    if not decay:
        model.bfloat16()
        with torch.no_grad():
            half = []
            for backend in ("auto", "torch"):
                for layer in layers:
                    layer.settings.backend = backend
                half.append(model(ids, use_cache=False).logits.float())
        assert ((half[0] - half[1]).norm() / half[1].norm()).item() < 3e-2
