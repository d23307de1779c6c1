import math

import pytest
import torch
from helpers import assert_refused_in_every_mode, token_decays

from dijiang.ops import (
    chunk_window_attention,
    naive_window_attention,
    recurrent_window_attention,
    window_attention,
)

FORMS = ["chunk", "recurrent"]
STATE_KEYS = ("S", "k", "v", "kf", "mask")
SINK_KEYS = ("sink_k", "sink_v", "sink_mask")


def reference(q, k, v, qf, kf, log_decay, lin_weight, window, mask=None, eps=1e-6, sinks=0):
    """Explicit double loop in float64 over query t and key j (absolute positions, zero initial state).
    Sinks: the first ``sinks`` real tokens, softmax keys (besides their linear weight) once out of the window."""
    q, k, v, qf, kf, log_decay, lin_weight = (x.double() for x in (q, k, v, qf, kf, log_decay, lin_weight))
    batch, seq_len, heads, dv = v.shape
    scale = q.shape[-1] ** -0.5
    real = torch.ones(batch, seq_len, dtype=torch.bool) if mask is None else mask.bool()
    out = torch.zeros(batch, seq_len, heads, dv, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq_len):
            if not real[b, t]:
                continue
            in_window = [j for j in range(max(0, t - window + 1), t + 1) if real[b, j]]
            first = [j for j in range(seq_len) if real[b, j]][:sinks]
            sink_keys = [j for j in first if j <= t - window]
            scores = {j: scale * (q[b, t] * k[b, j]).sum(-1) for j in in_window + sink_keys}  # [H] each
            row_max = torch.stack(list(scores.values())).amax(0) if scores else torch.zeros(heads)
            num = torch.zeros(heads, dv, dtype=torch.float64)
            den = torch.zeros(heads, dtype=torch.float64)
            for j in range(t + 1):
                if not real[b, j]:
                    continue
                if j in in_window:
                    weight = torch.exp(scores[j] - row_max)
                else:
                    if log_decay.dim() == 1:
                        decay = torch.exp((t - window - j) * log_decay)
                    else:  # per token: the steps after key j left the window (at step j + window), up to t
                        decay = torch.exp(log_decay[b, j + window + 1 : t + 1].sum(0))
                    weight = lin_weight * decay * (qf[b, t] * kf[b, j]).sum(-1)
                    if j in sink_keys:
                        weight = weight + torch.exp(scores[j] - row_max)
                num += weight[:, None] * v[b, j]
                den += weight
            out[b, t] = num / (den[:, None] + eps)
    return out


def rel(a, b, floor=1e-30):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def make_inputs(batch=2, seq_len=9, heads=3, d=4, m=5, dv=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, d, generator=gen)
    k = torch.randn(batch, seq_len, heads, d, generator=gen)
    v = torch.randn(batch, seq_len, heads, dv, generator=gen)
    qf = torch.rand(batch, seq_len, heads, m, generator=gen)
    kf = torch.rand(batch, seq_len, heads, m, generator=gen)
    gammas = 1 - torch.exp(torch.linspace(math.log(1 / 4), math.log(1 / 64), heads))
    lin_weight = torch.linspace(0.5, 2.0, heads)
    return [x.to(dtype) for x in (q, k, v, qf, kf)] + [torch.log(gammas), lin_weight]


def assert_states_close(state, expected, tol=1e-5):
    sinks = "sink_k" in expected
    assert set(state) == set(STATE_KEYS + (SINK_KEYS if sinks else ()))
    assert torch.equal(state["mask"], expected["mask"])
    if sinks:
        assert torch.equal(state["sink_mask"], expected["sink_mask"])
    assert rel(state["S"], expected["S"], floor=1e-6) < tol
    for key in ("k", "v", "kf") + (("sink_k", "sink_v") if sinks else ()):
        assert state[key].dtype == expected[key].dtype
        assert rel(state[key], expected[key], floor=1e-6) < tol


def run_with_grads(fn, inputs, seed=1, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, state = fn(*leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (state["S"] * torch.randn(state["S"].shape, generator=gen)).sum()
    loss.backward()
    return o, state, [x.grad for x in leaves]


def assert_forms_match_naive(inputs, mode, cases):
    """The form ``mode`` equals the parallel form in outputs, final state and every gradient, for each
    (window, sinks) of ``cases``."""
    names = "q k v q_feat k_feat log_decay lin_weight".split()
    for window, sinks in cases:
        o_ref, s_ref, g_ref = run_with_grads(naive_window_attention, inputs, window=window, sinks=sinks)
        o, s, grads = run_with_grads(window_attention, inputs, window=window, mode=mode, sinks=sinks)
        assert rel(o, o_ref) < 1e-5, window
        assert_states_close(s, s_ref)
        for name, g, g0, x in zip(names, grads, g_ref, inputs):
            # a key that never reaches S or an output (T <= window) may get no grad at all
            g, g0 = (torch.zeros_like(x) if grad is None else grad for grad in (g, g0))
            assert rel(g, g0, floor=1e-3) < 1e-5, (name, window)


def assert_carrying_equals_one_call(inputs, pieces, window, sinks=0):
    """Calls over consecutive pieces ((length, mode) each), the state carried, equal one parallel call.
    A per-token log_decay (inputs[5], 3-D) is cut into the same pieces; returns the last state."""
    o_full, s_full = naive_window_attention(*inputs, window=window, output_final_state=True, sinks=sinks)
    per_token = 6 if inputs[5].dim() == 3 else 5
    outputs, state, start = [], None, 0
    for length, mode in pieces:
        part = [x[:, start : start + length] for x in inputs[:per_token]] + inputs[per_token:]
        o, state = window_attention(*part, window=window, mode=mode, initial_state=state, output_final_state=True,
                                    sinks=sinks)
        outputs.append(o)
        start += length
    assert rel(torch.cat(outputs, dim=1), o_full) < 1e-5
    assert_states_close(state, s_full)
    return state


@pytest.mark.parametrize("window", [1, 3, 4, 12])
def test_naive_matches_double_loop(window):
    inputs = make_inputs(seq_len=9)
    o, _ = naive_window_attention(*inputs, window=window)
    assert rel(o, reference(*inputs, window)) < 1e-6


def test_naive_matches_double_loop_with_mask():
    inputs = make_inputs(seq_len=9)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    o, _ = naive_window_attention(*inputs, window=3, attention_mask=mask)
    assert rel(o, reference(*inputs, 3, mask=mask)) < 1e-6


def test_scale_argument_is_used():
    inputs = make_inputs(seq_len=6)
    q, k = inputs[0], inputs[1]
    o_default, _ = naive_window_attention(*inputs, window=3)
    o_explicit, _ = naive_window_attention(*inputs, window=3, scale=q.shape[-1] ** -0.5)
    assert torch.equal(o_default, o_explicit)
    scaled = [q * 2.0, k] + inputs[2:]
    o_half, _ = naive_window_attention(*scaled, window=3, scale=0.5 * q.shape[-1] ** -0.5)
    assert rel(o_half, o_default) < 1e-6


@pytest.mark.parametrize("seq_len", [1, 7, 16, 37])
@pytest.mark.parametrize("mode", FORMS)
def test_forms_match_naive_outputs_states_and_grads(mode, seq_len):
    assert_forms_match_naive(make_inputs(seq_len=seq_len), mode, [(1, 0), (4, 0), (16, 0)])


@pytest.mark.parametrize("mode", ["parallel"] + FORMS)
def test_bf16_inputs(mode):
    inputs = make_inputs(seq_len=21, dtype=torch.bfloat16)
    o, state = window_attention(*inputs, window=4, mode=mode, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state["S"].dtype == torch.float32
    assert state["k"].dtype == torch.bfloat16
    assert rel(o, reference(*inputs, 4)) < 1e-2


@pytest.mark.parametrize(
    "pieces",
    [
        [(13, "chunk"), (7, "chunk")],
        [(5, "parallel"), (1, "recurrent"), (14, "chunk")],
        [(17, "chunk"), (1, "recurrent"), (1, "recurrent"), (1, "recurrent")],
        [(1, "recurrent"), (2, "chunk"), (17, "parallel")],
    ],
)
def test_state_carrying_equals_one_long_call(pieces):
    assert_carrying_equals_one_call(make_inputs(seq_len=sum(n for n, _ in pieces)), pieces, window=4)


@pytest.mark.parametrize("mode", ["parallel"] + FORMS)
def test_left_padding_matches_unpadded(mode):
    lengths, seq_len, window = [11, 6, 2], 11, 4
    inputs = make_inputs(batch=3, seq_len=seq_len)
    mask = torch.zeros(3, seq_len, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, seq_len - n :] = True
    # garbage in the padded slots must not leak
    per_token = [torch.where(mask[:, :, None, None], x, torch.full_like(x, 7.0)) for x in inputs[:5]]
    o, final = window_attention(
        *per_token, *inputs[5:], window=window, mode=mode, attention_mask=mask.long(), output_final_state=True
    )
    assert (o[~mask] == 0).all()
    for b, n in enumerate(lengths):
        real = [x[b : b + 1, seq_len - n :] for x in per_token]
        o_b, s_b = naive_window_attention(*real, *inputs[5:], window=window, output_final_state=True)
        assert rel(o[b : b + 1, seq_len - n :], o_b) < 1e-5
        assert rel(final["S"][b : b + 1], s_b["S"], floor=1e-6) < 1e-5
        kept = min(n, window)  # the buffer's real slots are the newest tokens
        assert torch.equal(final["mask"][b, window - kept :], torch.ones(kept, dtype=torch.bool))
        assert not final["mask"][b, : window - kept].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_is_stable(dtype):
    seq_len, heads = 16_384, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v, qf, kf = (
        torch.randn(1, seq_len, heads, 16, generator=gen).to(dtype).requires_grad_(True) for _ in range(5)
    )
    gammas = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), heads))
    log_decay = torch.log(gammas).requires_grad_(True)
    lin_weight = torch.ones(heads, requires_grad=True)
    leaves = (q, k, v, qf, kf, log_decay, lin_weight)
    o, state = window_attention(q, k, v, qf.abs(), kf.abs(), log_decay, lin_weight, window=64, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state["S"]).all()
    o.float().sum().backward()
    for x in leaves:
        assert torch.isfinite(x.grad).all()


def test_all_forms_are_exported_and_no_state_unless_asked():
    inputs = make_inputs(seq_len=6)
    expected, none = naive_window_attention(*inputs, window=2)
    assert none is None
    for fn in (chunk_window_attention, recurrent_window_attention):
        o, state = fn(*inputs, window=2)
        assert state is None and rel(o, expected) < 1e-5


def _bad_calls():
    q, k, v, qf, kf, log_decay, lin_weight = make_inputs(batch=2, seq_len=6, heads=3, d=4, m=5, dv=4)
    base = dict(q=q, k=k, v=v, q_feat=qf, k_feat=kf, log_decay=log_decay, lin_weight=lin_weight, window=4)
    _, good_state = naive_window_attention(**base, output_final_state=True)
    return [
        ("must be 4-D", dict(q=q[0])),
        ("must be 4-D", dict(k_feat=kf[..., None])),
        ("agree on", dict(v=v[:1])),
        ("agree on", dict(q_feat=qf[:, :5])),
        ("agree on", dict(k=k[:, :, :2])),
        ("head dims differ", dict(k=torch.randn(2, 6, 3, 5))),
        ("feature dims differ", dict(k_feat=torch.rand(2, 6, 3, 6))),
        ("log_decay must have shape", dict(log_decay=log_decay[:2])),
        ("log_decay must be <= 0", dict(log_decay=log_decay.abs())),
        ("lin_weight must have shape", dict(lin_weight=lin_weight[None])),
        ("lin_weight must be > 0", dict(lin_weight=-lin_weight)),
        ("window must be", dict(window=0)),
        ("unknown mode", dict(mode="fused")),
        ("initial_state must be a dict", dict(initial_state=good_state["S"])),
        ("initial_state must be a dict", dict(initial_state={"S": good_state["S"]})),
        ("initial_state\\['k'\\] must have shape", dict(initial_state={**good_state, "k": good_state["k"][:, :3]})),
        ("initial_state\\['S'\\] must have shape", dict(initial_state={**good_state, "S": good_state["S"][..., :4]})),
        ("attention_mask must have shape", dict(attention_mask=torch.ones(2, 7))),
    ], base


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])))
def test_bad_input_raises_value_error(case):
    cases, base = _bad_calls()
    message, overrides = cases[case]
    assert_refused_in_every_mode(window_attention, base, overrides, message, ["parallel"] + FORMS)


@pytest.mark.parametrize("window,sinks", [(1, 1), (3, 2), (4, 4), (12, 3)])
def test_sinks_naive_matches_double_loop(window, sinks):
    inputs = make_inputs(seq_len=15)
    o, _ = naive_window_attention(*inputs, window=window, sinks=sinks)
    assert rel(o, reference(*inputs, window, sinks=sinks)) < 1e-6
    mask = torch.tensor([[0, 0, 0] + [1] * 12, [1, 1, 0, 0, 0, 1, 0, 1] + [1] * 7], dtype=torch.bool)
    o, _ = naive_window_attention(*inputs, window=window, attention_mask=mask, sinks=sinks)
    assert rel(o, reference(*inputs, window, mask=mask, sinks=sinks)) < 1e-6


def test_sinks_change_the_output_only_past_the_window():
    inputs = make_inputs(seq_len=20)
    plain, _ = naive_window_attention(*inputs, window=4)
    with_sinks, _ = naive_window_attention(*inputs, window=4, sinks=2)
    assert torch.equal(plain[:, :4], with_sinks[:, :4])  # no sink has left the window yet
    assert rel(with_sinks[:, 4:], plain[:, 4:]) > 1e-2


@pytest.mark.parametrize("seq_len", [1, 7, 16, 37])
@pytest.mark.parametrize("mode", FORMS)
def test_sinks_forms_match_naive_outputs_states_and_grads(mode, seq_len):
    assert_forms_match_naive(make_inputs(seq_len=seq_len), mode, [(1, 2), (4, 3), (16, 4)])


@pytest.mark.parametrize(
    "pieces",
    [
        [(3, "chunk"), (2, "recurrent"), (15, "chunk")],
        [(1, "recurrent"), (1, "recurrent"), (1, "recurrent"), (17, "parallel")],
        [(13, "chunk"), (7, "recurrent")],
    ],
)
def test_sinks_state_carrying_equals_one_long_call(pieces):
    inputs = make_inputs(seq_len=sum(n for n, _ in pieces))
    state = assert_carrying_equals_one_call(inputs, pieces, window=4, sinks=3)
    assert state["sink_mask"].all()


@pytest.mark.parametrize("mode", ["parallel"] + FORMS)
def test_sinks_left_padding_matches_unpadded(mode):
    lengths, seq_len, window, sinks = [11, 6, 2], 11, 3, 2
    inputs = make_inputs(batch=3, seq_len=seq_len)
    mask = torch.zeros(3, seq_len, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, seq_len - n :] = True
    per_token = [torch.where(mask[:, :, None, None], x, torch.full_like(x, 7.0)) for x in inputs[:5]]
    o, final = window_attention(*per_token, *inputs[5:], window=window, mode=mode, attention_mask=mask,
                                output_final_state=True, sinks=sinks)
    for b, n in enumerate(lengths):
        real = [x[b : b + 1, seq_len - n :] for x in per_token]
        o_b, s_b = naive_window_attention(*real, *inputs[5:], window=window, output_final_state=True, sinks=sinks)
        assert rel(o[b : b + 1, seq_len - n :], o_b) < 1e-5
        assert torch.equal(final["sink_mask"][b : b + 1], s_b["sink_mask"])
        assert rel(final["sink_k"][b : b + 1], s_b["sink_k"], floor=1e-6) < 1e-6


def test_sinks_bad_input_raises_value_error():
    inputs = make_inputs(seq_len=6)
    _, plain_state = naive_window_attention(*inputs, window=2, output_final_state=True)
    for mode in ["parallel"] + FORMS:
        with pytest.raises(ValueError, match="sinks must be an int"):
            window_attention(*inputs, window=2, mode=mode, sinks=-1)
        with pytest.raises(ValueError, match="initial_state must be a dict with keys"):
            window_attention(*inputs, window=2, mode=mode, sinks=2, initial_state=plain_state)


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 0), (4, 2), (12, 0)])
def test_token_decays_naive_matches_double_loop(window, sinks):
    inputs = make_inputs(seq_len=15)
    inputs[5] = token_decays(seq_len=15)
    o, _ = naive_window_attention(*inputs, window=window, sinks=sinks)
    assert rel(o, reference(*inputs, window, sinks=sinks)) < 1e-6


def test_token_decays_equal_to_a_per_head_decay_repeated():
    inputs = make_inputs(seq_len=23)
    repeated = inputs[:5] + [inputs[5].expand(2, 23, -1).clone(), inputs[6]]
    for mode in ["parallel"] + FORMS:
        o, s = window_attention(*inputs, window=4, mode=mode, output_final_state=True)
        o2, s2 = window_attention(*repeated, window=4, mode=mode, output_final_state=True)
        assert rel(o2, o) < 1e-6 and rel(s2["S"], s["S"]) < 1e-6, mode


@pytest.mark.parametrize("seq_len", [1, 7, 16, 37])
@pytest.mark.parametrize("mode", FORMS)
def test_token_decays_forms_match_naive_outputs_states_and_grads(mode, seq_len):
    inputs = make_inputs(seq_len=seq_len)
    inputs[5] = token_decays(seq_len=seq_len)
    assert_forms_match_naive(inputs, mode, [(1, 0), (4, 2), (16, 0)])


@pytest.mark.parametrize("pieces", [[(13, "chunk"), (7, "recurrent")], [(5, "parallel"), (1, "recurrent"), (14, "chunk")]])
def test_token_decays_state_carrying_equals_one_long_call(pieces):
    total = sum(n for n, _ in pieces)
    inputs = make_inputs(seq_len=total)
    inputs[5] = token_decays(seq_len=total)
    assert_carrying_equals_one_call(inputs, pieces, window=4)


def test_token_decays_bad_shape_or_sign_is_refused():
    inputs = make_inputs(seq_len=6)
    for mode in ["parallel"] + FORMS:
        with pytest.raises(ValueError, match="per-token log_decay must have shape"):
            window_attention(*inputs[:5], token_decays(seq_len=5), inputs[6], window=2, mode=mode)
        with pytest.raises(ValueError, match="must be <= 0"):
            window_attention(*inputs[:5], -token_decays(seq_len=6), inputs[6], window=2, mode=mode)
