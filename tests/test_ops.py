import math

import pytest
import torch
from helpers import assert_refused_in_every_mode, token_decays

from dijiang.ops import (
    chunk_linear_attention,
    linear_attention,
    naive_linear_attention,
    recurrent_linear_attention,
)

FORMS = ["chunk", "recurrent"]


def reference(q, k, v, log_decay, normalize=False, mask=None, initial_state=None, eps=1e-6):
    """Explicit double loop in float64. A padded token contributes nothing and does not advance time.
    log_decay: [H], or [B, T, H] per token (step s decays what came before token s)."""
    q, k, v, log_decay = (x.double() for x in (q, k, v, log_decay))
    batch, seq_len, heads, dv = v.shape
    real = torch.ones(batch, seq_len, dtype=torch.bool) if mask is None else mask.bool()
    steps = log_decay.expand(batch, seq_len, heads) * real[:, :, None]  # padded steps do not decay
    state = None if initial_state is None else initial_state.double()
    out = torch.zeros(batch, seq_len, heads, dv, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq_len):
            if not real[b, t]:
                continue
            num = torch.zeros(heads, dv, dtype=torch.float64)
            den = torch.zeros(heads, dtype=torch.float64)
            for j in range(t + 1):
                if not real[b, j]:
                    continue
                weight = torch.exp(steps[b, j + 1 : t + 1].sum(0)) * (q[b, t] * k[b, j]).sum(-1)  # [H]
                num += weight[:, None] * v[b, j]
                den += weight
            if state is not None:
                weight = torch.exp(steps[b, : t + 1].sum(0))[:, None]
                num += weight * torch.einsum("hm,hmv->hv", q[b, t], state[b, :, :, :dv])
                if normalize:
                    den += weight[:, 0] * torch.einsum("hm,hm->h", q[b, t], state[b, :, :, dv])
            out[b, t] = num / (den[:, None] + eps) if normalize else num
    return out


def rel(a, b, floor=1e-30):
    """||a - b|| / ||b||; ``floor`` bounds the denominator for quantities that are ~0 by cancellation."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def make_inputs(batch=2, seq_len=9, heads=3, m=5, dv=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, seq_len, heads, m, generator=gen).to(dtype)
    k = torch.rand(batch, seq_len, heads, m, generator=gen).to(dtype)
    v = torch.randn(batch, seq_len, heads, dv, generator=gen).to(dtype)
    gammas = 1 - torch.exp(torch.linspace(math.log(1 / 4), math.log(1 / 64), heads))
    return q, k, v, torch.log(gammas)


def run_with_grads(fn, q, k, v, log_decay, seed=1, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, log_decay)]
    o, state = fn(*leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen)).sum()
    loss.backward()
    return o, state, [x.grad for x in leaves]


@pytest.mark.parametrize("normalize", [False, True])
def test_naive_matches_double_loop(normalize):
    q, k, v, log_decay = make_inputs(seq_len=7)
    o, _ = naive_linear_attention(q, k, v, log_decay, normalize=normalize)
    assert rel(o, reference(q, k, v, log_decay, normalize)) < 1e-6


@pytest.mark.parametrize("normalize", [False, True])
def test_naive_matches_double_loop_with_mask_and_state(normalize):
    q, k, v, log_decay = make_inputs(seq_len=7)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    state = torch.rand(2, 3, 5, 4 + normalize)
    o, _ = naive_linear_attention(
        q, k, v, log_decay, normalize=normalize, attention_mask=mask, initial_state=state
    )
    expected = reference(q, k, v, log_decay, normalize, mask=mask, initial_state=state)
    assert rel(o, expected) < 1e-6


def test_naive_final_state_is_the_sum_of_decayed_outer_products():
    q, k, v, log_decay = make_inputs(seq_len=6)
    _, state = naive_linear_attention(q, k, v, log_decay, output_final_state=True)
    steps = torch.arange(5, -1, -1, dtype=torch.float64)
    weights = torch.exp(steps[:, None] * log_decay.double())  # [T, H]
    expected = torch.einsum("bjhm,jh,bjhv->bhmv", k.double(), weights, v.double())
    assert state.dtype == torch.float32 and rel(state, expected) < 1e-6


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seq_len", [1, 7, 16, 37])
@pytest.mark.parametrize("mode", FORMS)
def test_forms_match_naive_outputs_states_and_grads(mode, seq_len, normalize):
    q, k, v, log_decay = make_inputs(seq_len=seq_len)
    o_ref, s_ref, g_ref = run_with_grads(naive_linear_attention, q, k, v, log_decay, normalize=normalize)
    chunk_sizes = [1, 4, 16, 64] if mode == "chunk" else [64]
    for chunk_size in chunk_sizes:
        o, s, grads = run_with_grads(
            linear_attention, q, k, v, log_decay, mode=mode, chunk_size=chunk_size, normalize=normalize
        )
        assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
        for name, g, g0 in zip("q k v log_decay".split(), grads, g_ref):
            # with normalize and T=1, o = v (q.k) / (q.k + eps) barely depends on q, k: grads ~1e-7
            assert rel(g, g0, floor=0.1) < 1e-5, (name, chunk_size)


@pytest.mark.parametrize("mode", ["parallel"] + FORMS)
def test_bf16_inputs(mode):
    q, k, v, log_decay = make_inputs(seq_len=21, dtype=torch.bfloat16)
    o, state = linear_attention(q, k, v, log_decay, mode=mode, chunk_size=8, output_final_state=True)
    expected = reference(q, k, v, log_decay)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel(o, expected) < 1e-2


@pytest.mark.parametrize("mode", ["parallel"] + FORMS)
def test_log_decay_gets_gradient_in_every_mode(mode):
    q, k, v, log_decay = make_inputs(seq_len=5)
    log_decay.requires_grad_(True)
    o, _ = linear_attention(q, k, v, log_decay, mode=mode, chunk_size=2)
    o.sum().backward()
    assert log_decay.grad is not None and log_decay.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "pieces",
    [
        [(13, "chunk"), (7, "chunk")],
        [(5, "parallel"), (1, "recurrent"), (14, "chunk")],
        [(17, "chunk"), (1, "recurrent"), (1, "recurrent"), (1, "recurrent")],
        [(1, "recurrent"), (19, "chunk")],
    ],
)
def test_state_carrying_equals_one_long_call(pieces, normalize):
    total = sum(n for n, _ in pieces)
    q, k, v, log_decay = make_inputs(seq_len=total)
    o_full, s_full = naive_linear_attention(q, k, v, log_decay, normalize=normalize, output_final_state=True)
    outputs, state, start = [], None, 0
    for length, mode in pieces:
        part = slice(start, start + length)
        o, state = linear_attention(
            q[:, part], k[:, part], v[:, part], log_decay, mode=mode, chunk_size=4,
            initial_state=state, output_final_state=True, normalize=normalize,
        )
        outputs.append(o)
        start += length
    assert rel(torch.cat(outputs, dim=1), o_full) < 1e-5
    assert rel(state, s_full) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_is_stable(dtype):
    seq_len, heads = 65_536, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(1, seq_len, heads, 16, generator=gen).to(dtype).requires_grad_(True)
    k = torch.rand(1, seq_len, heads, 16, generator=gen).to(dtype).requires_grad_(True)
    v = torch.randn(1, seq_len, heads, 16, generator=gen).to(dtype).requires_grad_(True)
    gammas = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), heads))
    log_decay = torch.log(gammas).requires_grad_(True)
    for normalize in (False, True):
        o, state = linear_attention(q, k, v, log_decay, mode="chunk", normalize=normalize, output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(state).all()
        o.float().sum().backward()
        for x in (q, k, v, log_decay):
            assert torch.isfinite(x.grad).all()
            x.grad = None


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["parallel"] + FORMS)
def test_left_padding_matches_unpadded(mode, normalize):
    lengths, seq_len = [9, 4, 1], 9
    q, k, v, log_decay = make_inputs(batch=3, seq_len=seq_len)
    mask = torch.zeros(3, seq_len, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, seq_len - n :] = True
    # garbage in the padded slots must not leak
    q, k, v = (torch.where(mask[:, :, None, None], x, torch.full_like(x, 7.0)) for x in (q, k, v))
    zero_state = torch.zeros(3, 3, 5, 4 + normalize)
    for state in (None, zero_state):
        o, final = linear_attention(
            q, k, v, log_decay, mode=mode, chunk_size=4, normalize=normalize,
            attention_mask=mask.long(), initial_state=state, output_final_state=True,
        )
        assert (o[~mask] == 0).all()
        for b, n in enumerate(lengths):
            real = slice(seq_len - n, seq_len)
            o_b, s_b = naive_linear_attention(
                q[b : b + 1, real], k[b : b + 1, real], v[b : b + 1, real], log_decay,
                normalize=normalize, output_final_state=True,
            )
            assert rel(o[b : b + 1, real], o_b) < 1e-5
            assert rel(final[b : b + 1], s_b) < 1e-5


@pytest.mark.parametrize("mode", FORMS)
def test_padded_decode_step_keeps_the_state(mode):
    q, k, v, log_decay = make_inputs(batch=2, seq_len=1)
    state = torch.rand(2, 3, 5, 4)
    mask = torch.tensor([[True], [False]])
    o, new_state = linear_attention(
        q, k, v, log_decay, mode=mode, initial_state=state, attention_mask=mask, output_final_state=True
    )
    assert (o[1] == 0).all()
    assert torch.equal(new_state[1], state[1])
    assert not torch.allclose(new_state[0], state[0])


def test_all_forms_are_exported():
    q, k, v, log_decay = make_inputs(seq_len=5)
    expected, _ = naive_linear_attention(q, k, v, log_decay)
    for fn in (chunk_linear_attention, recurrent_linear_attention):
        assert rel(fn(q, k, v, log_decay)[0], expected) < 1e-5


def test_returns_no_state_unless_asked():
    q, k, v, log_decay = make_inputs(seq_len=5)
    for mode in ["parallel"] + FORMS:
        assert linear_attention(q, k, v, log_decay, mode=mode)[1] is None


def _bad_calls():
    q, k, v, log_decay = make_inputs(batch=2, seq_len=6, heads=3, m=5, dv=4)
    return [
        ("must be 4-D", dict(q=q[0])),
        ("must be 4-D", dict(v=v[..., None])),
        ("agree on", dict(k=k[:1])),
        ("agree on", dict(v=v[:, :5])),
        ("agree on", dict(k=k[:, :, :2])),
        ("feature dims differ", dict(k=torch.rand(2, 6, 3, 6))),
        ("log_decay must have shape", dict(log_decay=log_decay[:2])),
        ("log_decay must have shape", dict(log_decay=log_decay[None])),
        ("log_decay must be <= 0", dict(log_decay=log_decay.abs())),
        ("unknown mode", dict(mode="fused")),
        ("chunk_size", dict(chunk_size=0)),
        ("initial_state must have shape", dict(initial_state=torch.zeros(2, 3, 5, 5))),
        ("initial_state must have shape", dict(initial_state=torch.zeros(2, 3, 5, 4), normalize=True)),
        ("attention_mask must have shape", dict(attention_mask=torch.ones(2, 5))),
    ], dict(q=q, k=k, v=v, log_decay=log_decay)


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])))
def test_bad_input_raises_value_error(case):
    cases, base = _bad_calls()
    message, overrides = cases[case]
    assert_refused_in_every_mode(linear_attention, base, overrides, message, ["parallel"] + FORMS)


@pytest.mark.parametrize("normalize", [False, True])
def test_token_decays_naive_matches_double_loop_with_mask_and_state(normalize):
    q, k, v, _ = make_inputs(seq_len=11)
    log_decay = token_decays(seq_len=11)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False
    state = torch.rand(2, 3, 5, 4 + normalize)
    o, _ = naive_linear_attention(q, k, v, log_decay, normalize=normalize, attention_mask=mask, initial_state=state)
    assert rel(o, reference(q, k, v, log_decay, normalize, mask, state)) < 1e-6


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seq_len", [1, 16, 37])
@pytest.mark.parametrize("mode", FORMS)
def test_token_decays_forms_match_naive_outputs_states_and_grads(mode, seq_len, normalize):
    q, k, v, _ = make_inputs(seq_len=seq_len)
    log_decay = token_decays(seq_len=seq_len)
    o_ref, s_ref, g_ref = run_with_grads(naive_linear_attention, q, k, v, log_decay, normalize=normalize)
    for chunk_size in ([1, 4, 64] if mode == "chunk" else [64]):
        o, s, grads = run_with_grads(linear_attention, q, k, v, log_decay, mode=mode, chunk_size=chunk_size,
                                     normalize=normalize)
        assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
        for name, g, g0 in zip("q k v log_decay".split(), grads, g_ref):
            assert g.shape == g0.shape and rel(g, g0, floor=0.1) < 1e-5, (name, chunk_size)


def test_token_decays_equal_to_a_per_head_decay_repeated_and_carry_state():
    q, k, v, log_decay = make_inputs(seq_len=20)
    repeated = log_decay.expand(2, 20, -1).clone()
    for mode in ["parallel"] + FORMS:
        o, s = linear_attention(q, k, v, log_decay, mode=mode, chunk_size=4, output_final_state=True)
        o2, s2 = linear_attention(q, k, v, repeated, mode=mode, chunk_size=4, output_final_state=True)
        assert rel(o2, o) < 1e-6 and rel(s2, s) < 1e-6, mode
    decays = token_decays(seq_len=20)
    whole, final = naive_linear_attention(q, k, v, decays, output_final_state=True)
    head, state = linear_attention(q[:, :13], k[:, :13], v[:, :13], decays[:, :13], mode="chunk", chunk_size=4,
                                   output_final_state=True)
    tail, state = linear_attention(q[:, 13:], k[:, 13:], v[:, 13:], decays[:, 13:], mode="recurrent",
                                   initial_state=state, output_final_state=True)
    assert rel(torch.cat([head, tail], dim=1), whole) < 1e-5 and rel(state, final) < 1e-5


def test_token_decays_bad_shape_or_sign_is_refused():
    q, k, v, _ = make_inputs(seq_len=6)
    for mode in ["parallel"] + FORMS:
        with pytest.raises(ValueError, match="per-token log_decay must have shape"):
            linear_attention(q, k, v, token_decays(seq_len=5), mode=mode)
        with pytest.raises(ValueError, match="must be <= 0"):
            linear_attention(q, k, v, -token_decays(seq_len=6), mode=mode)
