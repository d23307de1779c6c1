"""The gated delta rule (dijiang.ops.delta) and pure layers that use it (state_update="delta")."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import dijiang
from dijiang.conversion import iter_dijiang_layers
from dijiang.fast_decode import supports_fast_decode
from dijiang.hf_compat import output_cache
from dijiang.ops.delta import chunk_delta_rule, delta_rule, fla_available, recurrent_delta_rule
from helpers import VOCAB, left_padded, reference, tiny_model
from test_conversion import incremental_logits, rel_err


def plain_delta_rule(q, k, v, g, beta, state):
    """The rule written out per batch row, head and token, in float64: the check on both forms."""
    B, T, H, _ = k.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S = state.double().clone()
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kt, vt = k[b, t, h].double(), v[b, t, h].double()
                S[b, h] = torch.exp(g[b, t, h].double()) * S[b, h]
                S[b, h] = S[b, h] + beta[b, t, h].double() * torch.outer(kt, vt - S[b, h].T @ kt)
                out[b, t, h] = S[b, h].T @ q[b, t, h].double()
    return out, S


def inputs(B=2, T=37, H=3, m=8, dv=5, seed=0, per_token=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, m, generator=gen)
    k = F.normalize(torch.randn(B, T, H, m, generator=gen), dim=-1)
    v = torch.randn(B, T, H, dv, generator=gen)
    g = -0.3 * torch.rand(B, T, H, generator=gen) if per_token else -0.3 * torch.rand(H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, m, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunk_and_recurrent_forms_equal_the_rule(per_token, chunk_size):
    q, k, v, g, beta, state = inputs(per_token=per_token)
    g_full = g.expand(*beta.shape) if g.dim() == 1 else g
    expected, expected_state = plain_delta_rule(q, k, v, g_full, beta, state)
    for o, final in (recurrent_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True),
                     chunk_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, initial_state=state,
                                      output_final_state=True)):
        assert (o.double() - expected).abs().max() < 1e-4
        assert (final.double() - expected_state).abs().max() < 1e-4


def test_gradients_of_the_chunk_form_equal_the_recurrent_form():
    leaves = [x.double().requires_grad_() for x in inputs(T=19)]
    grads = []
    for form in (lambda *a: recurrent_delta_rule(*a[:5], initial_state=a[5], output_final_state=True),
                 lambda *a: chunk_delta_rule(*a[:5], chunk_size=4, initial_state=a[5], output_final_state=True)):
        o, final = form(*leaves)
        grads.append(torch.autograd.grad((o * o.detach().sin()).sum() + final.cos().sum(), leaves))
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-5 * (1 + b.abs().max())  # both forms accumulate in float32


def test_carried_state_equals_one_call_and_padding_changes_nothing():
    q, k, v, g, beta, _ = inputs(T=30)
    whole, state = chunk_delta_rule(q, k, v, g, beta, chunk_size=8, output_final_state=True)
    first, mid = chunk_delta_rule(q[:, :13], k[:, :13], v[:, :13], g[:, :13], beta[:, :13], chunk_size=8,
                                  output_final_state=True)
    rest, end = chunk_delta_rule(q[:, 13:], k[:, 13:], v[:, 13:], g[:, 13:], beta[:, 13:], chunk_size=8,
                                 initial_state=mid, output_final_state=True)
    assert (torch.cat([first, rest], 1) - whole).abs().max() < 1e-5 and (end - state).abs().max() < 1e-5
    # left padding: 5 junk tokens in front of row 0 leave its real tokens' outputs and state as without them
    pad = 5
    junk = [torch.randn(1, pad, *x.shape[2:]) for x in (q, k, v)]
    padded = [torch.cat([j, x[:1]], 1) for j, x in zip(junk, (q, k, v))]
    gp, bp = torch.cat([-torch.rand(1, pad, 3), g[:1]], 1), torch.cat([torch.rand(1, pad, 3), beta[:1]], 1)
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 30)], 1)
    for mode in ("chunk", "recurrent"):
        o, s = delta_rule(*padded, gp, bp, mode=mode, chunk_size=8, attention_mask=mask, output_final_state=True)
        assert o[:, :pad].abs().max() == 0
        assert (o[:, pad:] - whole[:1]).abs().max() < 1e-5 and (s - state[:1]).abs().max() < 1e-5


def test_bad_inputs_are_refused():
    q, k, v, g, beta, state = inputs()
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule(q, k, v, g, beta[:, :, :1])
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule(q, k, v, g, beta, initial_state=state[:, :1])
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        delta_rule(q, k, v, -g, beta)
    with pytest.raises(ValueError, match="mode"):
        delta_rule(q, k, v, g, beta, mode="parallel")
    with pytest.raises(ValueError, match="state_update"):
        dijiang.convert(tiny_model("llama"), dict(state_update="overwrite"))
    for settings in (dict(state_decay=False), dict(state_decay=False, state_update="delta", decay_gate=True)):
        with pytest.raises(ValueError, match="DeltaNet's rule"):
            dijiang.convert(tiny_model("llama"), settings)


def test_no_decay_is_a_zero_log_decay():
    q, k, v, _, beta, state = inputs(T=21)
    zero = torch.zeros(3)
    for mode in ("chunk", "recurrent"):
        expected = delta_rule(q, k, v, zero, beta, mode=mode, chunk_size=8, initial_state=state, output_final_state=True)
        got = delta_rule(q, k, v, None, beta, mode=mode, chunk_size=8, initial_state=state, output_final_state=True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("feature_map,window,decay", [("dijiang", 0, "gate"), ("hedgehog", 0, "gate"),
                                                      ("dijiang", 4, "gate"), ("hedgehog", 5, "gate"),
                                                      ("hedgehog", 0, "none"), ("dijiang", 4, "none")])
def test_delta_layers_train_decode_from_their_state_and_round_trip(tmp_path, feature_map, window, decay):
    """Pure delta layers, and window layers with a delta branch (window 4 + 1 sink, 5 without sinks: 20 tokens
    take them well past the window); decay "gate": the data-dependent decay, "none": DeltaNet's state that never
    decays (state_decay=False)."""
    ids = torch.randint(3, VOCAB, (2, 20))
    sinks = 1 if window == 4 else 0
    decay_settings = dict(decay_gate=True) if decay == "gate" else dict(state_decay=False)
    model = dijiang.convert(tiny_model("llama", seed=4), dict(state_update="delta", feature_map=feature_map,
                                                             window=window, sinks=sinks, **decay_settings)).eval()
    layers = [layer for _, layer in iter_dijiang_layers(model)]
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for layer in layers:
        assert layer.delta_beta.grad.abs().sum() > 0 and layer.delta_beta_logit.grad.abs().sum() > 0
        assert any(p is layer.delta_beta for p in layer.new_parameters())
        if window:
            assert layer.window_mix.grad.abs().sum() > 0
        if decay == "none":  # nothing to learn about a decay that is not there
            assert not isinstance(layer.decay_logit, torch.nn.Parameter) and layer.log_decay.abs().max() == 0
    model.eval()
    with torch.no_grad():
        for layer in layers:
            layer.delta_beta.normal_(std=0.5)
        logits = model(ids, use_cache=False).logits
        stepped, _ = incremental_logits(model, ids, prefill=7)  # prefill in chunks, then the recurrent step
        assert rel_err(stepped, logits) < 1e-5
        if window:  # the cache holds the window, the sinks and the delta state; the window op's linear state is empty
            cache = output_cache(model(ids, use_cache=True))
            for state in (cache.layers[i].state for i in range(len(layers))):
                assert state["S"].numel() == 0 and state["kf"].numel() == 0 and state["delta"].numel() > 0
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(ids, use_cache=False).logits, logits)
    ok, why = supports_fast_decode(model)
    assert not ok and "state_update='delta'" in why
    padded, mask = left_padded()
    out = reference(model, padded, mask, 6)  # generate runs it, padded rows included
    alone = reference(model, padded[1:, -4:], mask[1:, -4:], 6)
    assert torch.equal(out[1:, -10:], alone)


def _fla_usable(gated: bool) -> bool:
    return torch.cuda.is_available() and fla_available(gated)


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [
    pytest.param(per_token, marks=pytest.mark.skipif(not _fla_usable(per_token is not None),
                                                     reason="needs CUDA and a usable fla (fla_unusable)"))
    for per_token in (True, False, None)])
def test_cuda_fla_kernel_equals_the_chunk_form(per_token):
    """fla's chunk_gated_delta_rule (per_token True / False: per-token and per-head decays) or, with no decay (None),
    its chunk_delta_rule, under the same contract: outputs, final state, every gradient. The ungated kernel takes
    only half precision (it asserts so): bfloat16 q, k, v, beta there, against the float32 forms on the same
    values, with bfloat16's tolerance."""
    args = [x.cuda() for x in inputs(B=2, T=300, H=4, m=64, dv=64, per_token=bool(per_token))]
    tolerance = 1.0
    if per_token is None:
        args[3] = None  # no decay
        args[:3] = [x.bfloat16() for x in args[:3]]
        args[4] = args[4].bfloat16()
        tolerance = 10.0  # bfloat16's 8 mantissa bits against float32's forms
    args = [None if x is None else x.requires_grad_() for x in args]
    leaves = [x for x in args if x is not None]
    grads = []
    for backend in ("auto", "torch"):
        o, final = delta_rule(*args[:5], initial_state=args[5], output_final_state=True, backend=backend)
        outs = (o.float(), final.float())
        grads.append((outs, torch.autograd.grad((outs[0] * outs[0].detach().sin()).sum() + outs[1].sum(), leaves)))
    (o_fla, s_fla), g_fla = grads[0]
    (o_ref, s_ref), g_ref = grads[1]
    assert rel_err(o_fla, o_ref) < 2e-3 * tolerance and rel_err(s_fla, s_ref) < 2e-3 * tolerance
    for a, b in zip(g_fla, g_ref):
        assert rel_err(a, b) < 5e-3 * tolerance


def test_window_layer_with_a_delta_branch_is_the_window_plus_the_weighted_rule():
    """o = the window's softmax (what an additive hybrid gives with its branch off) + softplus(window_mix) x the
    delta rule over the layer's unit-norm features, every token included; switched off, the plain window."""
    from dijiang.evaluate import linear_branch_off

    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 24))
    settings = dict(window=6, sinks=2, feature_map="hedgehog")
    delta = dijiang.convert(tiny_model("llama", seed=5), dict(settings, state_update="delta")).eval()
    additive = dijiang.convert(tiny_model("llama", seed=5), settings).eval()
    with torch.no_grad():
        for (_, a), (_, b) in zip(iter_dijiang_layers(delta), iter_dijiang_layers(additive)):
            a.delta_beta.normal_(std=0.5)
            a.window_mix.fill_(0.3)
        with linear_branch_off(delta), linear_branch_off(additive):
            assert rel_err(delta(ids, use_cache=False).logits, additive(ids, use_cache=False).logits) < 1e-5
        layer = next(layer for _, layer in iter_dijiang_layers(delta))
        plain = next(layer for _, layer in iter_dijiang_layers(additive))
        q, k, v = (torch.randn(2, 24, layer.num_heads, layer.head_dim) for _ in range(3))
        o, _ = layer._attend(q, k, v, mode="chunk", mask=None, initial_state=None, output_final_state=False)
        with linear_branch_off(additive):
            window_only, _ = plain._attend(q, k, v, mode="chunk", mask=None, initial_state=None,
                                           output_final_state=False)
        qf = F.normalize(layer.feature_map(q), dim=-1)
        kf = F.normalize(layer.key_map(k), dim=-1)
        g = layer.step_log_decay(v).expand(2, 24, -1)
        rule, _ = plain_delta_rule(qf, kf, v, g, layer.write_strength(v), torch.zeros(2, layer.num_heads,
                                                                                       qf.shape[-1], v.shape[-1]))
        expected = window_only.double() + F.softplus(torch.tensor(0.3)).double() * rule
        assert (o.double() - expected).abs().max() < 1e-4
