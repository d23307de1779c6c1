"""Sliding-window softmax + decayed linear attention, one shared normaliser (the LoLCATs hybrid).

For query t, window keys W_t = {j : t - window < j <= t}, linear keys L_t = {j : j <= t - window}:

    a_j = exp(scale q_t.k_j - max_{i in W_t} scale q_t.k_i)                           j in W_t
    b_j = lin_weight_h * exp((t - window - j) * log_decay_h) * (q_feat_t . k_feat_j)  j in L_t
    o_t = (sum_W a_j v_j + sum_L b_j v_j) / (sum_W a_j + sum_L b_j + eps)

The linear decay is counted from the window edge: a key that just left the window has weight 1. A per-token
decay (``log_decay`` [B, T, H], data-dependent gates as in GLA) replaces (t - window - j) log_decay_h by the sum
of log_decay over the steps after key j left the window, up to t: step s (query s) decays what came before it.

Attention sinks (``sinks=S > 0``, StreamingLLM's): the first S real tokens to leave the window stay softmax
keys of every later query, inside the same max and normaliser as W_t (a_j over W_t and the sinks), so the
first tokens, where pretrained models park attention they do not need, stay visible at constant cost. They
also enter the linear state, as every token that leaves the window does.

State (fixed size, CUDA-graph friendly), a dict:
    "S":    [B, H, m, dv + 1] float32, sum over tokens that left the window of
            exp((edge - j) * log_decay) k_feat_j^T [v_j, 1], edge = newest token - window
            (lin_weight is applied at query time, not stored)
    "k":    [B, window, H, d]  the last `window` raw keys, oldest first (k.dtype)
    "v":    [B, window, H, dv] (v.dtype)
    "kf":   [B, window, H, m]  (k_feat.dtype)
    "mask": [B, window] bool, which slots hold real tokens
  and with sinks:
    "sink_k": [B, S, H, d], "sink_v": [B, S, H, dv] (k.dtype, v.dtype), "sink_mask": [B, S] bool, the sinks
            that have left the window so far, in order
A fresh state is all zeros with mask False: exactly what ``initial_state=None`` means.

Padding (``attention_mask`` 0/False): padded tokens take a window slot (time advances over them, unlike
``linear_attention``) but contribute nothing (zero key, value and normaliser) and get output 0. With
left padding the real tokens get exactly the unpadded results.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunk import chunk_states
from .naive import (
    _skip_value_checks,
    check_attention_mask,
    check_head_or_token_log_decay,
    check_rank4,
    check_same_bth,
    finish_outputs,
)

MODES = ("parallel", "chunk", "recurrent")


def check_lin_weight(lin_weight: Tensor, num_heads: int) -> None:
    if not isinstance(lin_weight, Tensor) or lin_weight.dim() != 1 or lin_weight.shape[0] != num_heads:
        shape = tuple(lin_weight.shape) if isinstance(lin_weight, Tensor) else type(lin_weight).__name__
        raise ValueError(f"lin_weight must have shape [H] = [{num_heads}], got {shape}")
    if not _skip_value_checks() and bool(torch.any(lin_weight <= 0)):
        raise ValueError("lin_weight must be > 0 (pass softplus/exp of the raw parameter)")


def expected_state_shapes(q, v, q_feat, window: int, sinks: int = 0) -> dict[str, tuple[int, ...]]:
    batch, _, heads, head_dim = q.shape
    shapes = {
        "S": (batch, heads, q_feat.shape[-1], v.shape[-1] + 1),
        "k": (batch, window, heads, head_dim),
        "v": (batch, window, heads, v.shape[-1]),
        "kf": (batch, window, heads, q_feat.shape[-1]),
        "mask": (batch, window),
    }
    if sinks:
        shapes.update(sink_k=(batch, sinks, heads, head_dim), sink_v=(batch, sinks, heads, v.shape[-1]),
                      sink_mask=(batch, sinks))
    return shapes


def check_sinks(sinks) -> None:
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0 (how many first tokens stay softmax keys), got {sinks!r}")


def check_window_state(state, expected: dict[str, tuple[int, ...]]) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or set(state) != set(expected):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"initial_state must be a dict with keys {sorted(expected)}, got {got}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"initial_state[{key!r}] must have shape {list(shape)}, got {tuple(state[key].shape)}")


def validate_window_inputs(q, k, v, q_feat, k_feat, log_decay, lin_weight, window, initial_state, attention_mask,
                           sinks=0):
    check_rank4(q=q, k=k, v=v, q_feat=q_feat, k_feat=k_feat)
    batch, seq_len, heads = check_same_bth(q=q, k=k, v=v, q_feat=q_feat, k_feat=k_feat)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q_feat.shape[-1] != k_feat.shape[-1]:
        raise ValueError(f"q_feat and k_feat feature dims differ: {q_feat.shape[-1]} vs {k_feat.shape[-1]}")
    check_head_or_token_log_decay(log_decay, batch, seq_len, heads)
    check_lin_weight(lin_weight, heads)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    check_sinks(sinks)
    check_window_state(initial_state, expected_state_shapes(q, v, q_feat, window, sinks))
    check_attention_mask(attention_mask, batch, seq_len)


class Tokens(NamedTuple):
    """float32 keys/values of a span of tokens; padded tokens zeroed, v augmented with a ones column."""

    k: Tensor  # [B, L, H, d]
    kf: Tensor  # [B, L, H, m]
    v: Tensor  # [B, L, H, dv + 1]
    mask: Tensor  # [B, L] bool


def _with_ones(v: Tensor) -> Tensor:
    """float32 v augmented with a ones column (the normaliser's)."""
    return torch.cat([v.float(), v.new_ones(v.shape[:-1] + (1,), dtype=torch.float32)], dim=-1)


def _tokens(k: Tensor, kf: Tensor, v: Tensor, mask: Tensor) -> Tokens:
    real = mask[:, :, None, None].float()
    return Tokens(k.float() * real, kf.float() * real, _with_ones(v) * real, mask)


def _cat(a: Tokens, b: Tokens) -> Tokens:
    return Tokens(*(torch.cat([x, y], dim=1) for x, y in zip(a, b)))


class Sinks(NamedTuple):
    """Attention sinks as float32 keys/values (v with its ones column), zero where a slot holds none."""

    k: Tensor  # [B, S, H, d]
    v: Tensor  # [B, S, H, dv + 1]
    mask: Tensor  # [B, S] bool
    pos: Tensor  # [B, S] long: index in buffer + current (the window query t sees it once pos <= t); -1: state


def _state_sinks(state: dict, sinks: int) -> Sinks | None:
    if not sinks:
        return None
    mask = state["sink_mask"].bool()
    real = mask[:, :, None, None].float()
    return Sinks(state["sink_k"].float() * real, _with_ones(state["sink_v"]) * real, mask,
                 torch.full_like(mask, -1, dtype=torch.long))


def _select_sinks(state: Sinks, tokens: Tokens) -> Sinks:
    """The first S real tokens among the state's sinks, then buffer + current: those leave the window first."""
    count = state.mask.shape[1]
    batch, length = tokens.mask.shape
    pos = torch.cat([state.pos, torch.arange(length, device=state.pos.device).expand(batch, -1)], dim=1)
    real = torch.cat([state.mask, tokens.mask], dim=1)
    rank = real.long().cumsum(dim=1) - 1
    picks = [real & (rank == r) for r in range(count)]
    index = torch.stack([pick.long().argmax(dim=1) for pick in picks], dim=1)  # the first True (0 if none)
    mask = torch.stack([pick.any(dim=1) for pick in picks], dim=1)

    def gather(x: Tensor) -> Tensor:
        picked = x.gather(1, index[:, :, None, None].expand(-1, -1, *x.shape[2:]))
        return picked * mask[:, :, None, None]

    return Sinks(gather(torch.cat([state.k, tokens.k], dim=1)), gather(torch.cat([state.v, tokens.v], dim=1)),
                 mask, pos.gather(1, index))


def _sink_scores(q: Tensor, sinks: Sinks, scale: float, query_index: Tensor) -> tuple[Tensor, Tensor]:
    """Scores [B, H, *Q, S] of queries q [B, H, *Q, d] against the sinks, and which the queries see
    (query_index [*Q]: each query's t)."""
    batch, heads = q.shape[:2]
    lead = q.dim() - 4  # dims between the heads and the query rows (the chunk index in the chunk form)
    keys = sinks.k.movedim(2, 1).reshape(batch, heads, *([1] * lead), *sinks.k.shape[1:2], sinks.k.shape[-1])
    scores = scale * (q @ keys.transpose(-1, -2))
    shape = (batch, 1) + (1,) * (lead + 1) + (sinks.mask.shape[1],)
    seen = sinks.mask.view(shape) & (sinks.pos.view(shape) <= query_index[..., None])
    return scores, seen


def _sink_values(sinks: Sinks, lead: int) -> Tensor:
    """Sink values as [B, H, 1 x lead, S, dv + 1], to multiply weights [B, H, *lead, T, S]."""
    batch, count, heads, width = sinks.v.shape
    return sinks.v.movedim(2, 1).reshape(batch, heads, *([1] * lead), count, width)


class Prepared(NamedTuple):
    q: Tensor  # [B, T, H, d] float32
    qf: Tensor  # [B, T, H, m] float32
    current: Tokens  # this call's tokens
    buffer: Tokens  # the `window` tokens before them (from the state)
    state: Tensor  # "S", [B, H, m, dv + 1] float32
    mask: Tensor | None  # [B, T] bool
    sinks: Sinks | None  # the state's sinks (None without sinks)
    log_decay: Tensor  # [B, T, H] float32: each step's decay ([1, T, H] for a per-head decay: it broadcasts)


def prepare_window_inputs(q, k, v, q_feat, k_feat, log_decay, lin_weight, window, initial_state,
                          attention_mask, sinks=0) -> Prepared:
    """Checked (`validate_window_inputs`) float32 inputs of every form, with the state's buffer as tokens."""
    validate_window_inputs(q, k, v, q_feat, k_feat, log_decay, lin_weight, window, initial_state, attention_mask,
                           sinks)
    batch, seq_len, heads, head_dim = q.shape
    if attention_mask is None:
        mask = None
        current_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=q.device)
    else:
        mask = current_mask = attention_mask.to(device=q.device, dtype=torch.bool)
    current = _tokens(k, k_feat, v, current_mask)
    if initial_state is None:
        shapes = expected_state_shapes(q, v, q_feat, window, sinks)
        zeros = {key: q.new_zeros(shape, dtype=torch.float32) for key, shape in shapes.items()}
        initial_state = {**zeros, "mask": zeros["mask"].bool()}
        if sinks:
            initial_state["sink_mask"] = zeros["sink_mask"].bool()
    buffer = _tokens(initial_state["k"], initial_state["kf"], initial_state["v"], initial_state["mask"].bool())
    steps = log_decay.float() if log_decay.dim() == 3 else log_decay.float().expand(1, seq_len, heads)
    return Prepared(q.float(), q_feat.float(), current, buffer, initial_state["S"].float(), mask,
                    _state_sinks(initial_state, sinks), steps)


def _pack_state(S: Tensor, last: Tokens, k: Tensor, v: Tensor, k_feat: Tensor,
                sinks: Sinks | None = None) -> dict[str, Tensor]:
    state = {
        "S": S,
        "k": last.k.to(k.dtype),
        "v": last.v[..., :-1].to(v.dtype),
        "kf": last.kf.to(k_feat.dtype),
        "mask": last.mask,
    }
    if sinks is not None:
        state.update(sink_k=sinks.k.to(k.dtype), sink_v=sinks.v[..., :-1].to(v.dtype), sink_mask=sinks.mask)
    return state


def _final_state(p: Prepared, tokens: Tokens, log_decay: Tensor, k, v, k_feat,
                 sinks: Sinks | None = None) -> dict[str, Tensor]:
    """State after the last token; ``tokens`` = buffer + current (length window + T); ``sinks`` the call's
    (``_select_sinks``), of which those that left the window by the last token stay."""
    seq_len = p.q.shape[1]
    window = tokens.k.shape[1] - seq_len
    # tokens 0 .. T-1 of the extended sequence have left the window (token j at step j); decay each by the
    # steps after it
    if log_decay.dim() == 1:  # one decay per head: closed forms
        steps = torch.arange(seq_len - 1, -1, -1, device=p.q.device, dtype=torch.float32)
        after = (steps[:, None] * log_decay.float())[None]  # [1, T, H]
        total = seq_len * log_decay.float()[None]
    else:  # suffix sums, not differences of one long cumsum (no cancellation over long inputs)
        after = torch.cat([p.log_decay.flip(1).cumsum(1).flip(1)[:, 1:], torch.zeros_like(p.log_decay[:, :1])], 1)
        total = p.log_decay.sum(dim=1)
    S = torch.exp(total)[:, :, None, None] * p.state
    S = S + torch.einsum("bjhm,bjh,bjhv->bhmv", tokens.kf[:, :seq_len], torch.exp(after), tokens.v[:, :seq_len])
    last = Tokens(*(x[:, seq_len : seq_len + window] for x in tokens))
    if sinks is not None:
        left = sinks.mask & (sinks.pos < seq_len)  # buffer + current tokens 0 .. T - 1 have left the window
        sinks = Sinks(sinks.k * left[:, :, None, None], sinks.v * left[:, :, None, None], left, sinks.pos)
    return _pack_state(S, last, k, v, k_feat, sinks)


def _softmax_weights(scores: Tensor, allowed: Tensor, sink_scores: Tensor | None = None,
                     sink_allowed: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """exp(score - max over allowed) where allowed, exactly 0 elsewhere; with sinks the max runs over the
    window and the sinks together, and the sinks' weights come second (else None)."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True)
    sink_masked = None
    if sink_scores is not None:
        sink_masked = sink_scores.masked_fill(~sink_allowed, float("-inf"))
        row_max = torch.maximum(row_max, sink_masked.amax(dim=-1, keepdim=True))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # no real key in window
    return torch.exp(masked - row_max), (None if sink_masked is None else torch.exp(sink_masked - row_max))


def _default_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def naive_window_attention(
    q, k, v, q_feat, k_feat, log_decay, lin_weight, *, window=64, scale=None,
    initial_state=None, output_final_state=False, attention_mask=None, eps=1e-6, sinks=0,
) -> tuple[Tensor, dict | None]:
    """Materialises [T, window + T] masks. For tests and short sequences only."""
    p = prepare_window_inputs(q, k, v, q_feat, k_feat, log_decay, lin_weight, window, initial_state, attention_mask,
                              sinks)
    tokens = _cat(p.buffer, p.current)  # key position j here is absolute position j - window
    chosen = _select_sinks(p.sinks, tokens) if sinks else None
    o = _dense_window(p, tokens, log_decay, lin_weight, _default_scale(q, scale), window, 0, chosen)
    final = _final_state(p, tokens, log_decay, k, v, k_feat, chosen) if output_final_state else None
    return finish_outputs(o, True, p.mask, eps, v.dtype), final


def _dense_window(p: Prepared, tokens: Tensor, log_decay, lin_weight, scale: float, window: int,
                  empty_slots: int, sinks: Sinks | None = None) -> Tensor:
    """Unnormalised outputs, every query against every key of ``tokens`` (buffer + current, slot j at absolute
    position j - window) but the first ``empty_slots`` buffer slots, which must hold no real token; and
    against ``sinks`` (``_select_sinks``), if any."""
    keys = Tokens(*(x[:, empty_slots:] for x in tokens))
    seq_len = p.q.shape[1]
    t = torch.arange(seq_len, device=p.q.device)[:, None]
    j = torch.arange(empty_slots, window + seq_len, device=p.q.device)[None, :]
    key_real = keys.mask[:, None, None, :]  # [B, 1, 1, keys]
    in_window = (j > t) & (j <= t + window) & key_real
    scores = scale * torch.einsum("bthd,bjhd->bhtj", p.q, keys.k)
    sink_scores = sink_seen = None
    if sinks is not None:
        sink_scores, sink_seen = _sink_scores(p.q.transpose(1, 2), sinks, scale, t[:, 0])
    a, a_sinks = _softmax_weights(scores, in_window, sink_scores, sink_seen)

    # key j joins the linear part at step j; query t sees it decayed by steps j + 1 .. t
    if log_decay.dim() == 1:  # one decay per head: closed forms (this form is the others' reference)
        ld = log_decay.float()
        lin_exponent = torch.where(j <= t, (t - j) * ld[:, None, None], float("-inf"))  # [H, T, keys]
        done = ((t + 1) * ld).T[None]  # [1, H, T]: steps 0 .. t
    else:
        done = p.log_decay.cumsum(dim=1).transpose(1, 2)  # [B, H, T]
        at_key = F.pad(done, [0, window])[..., empty_slots:]  # key j's own step (keys past T - 1 never join)
        lin_exponent = torch.where(j <= t, done[..., :, None] - at_key[..., None, :], float("-inf"))  # [B, H, T, keys]
    b = torch.exp(lin_exponent) * torch.einsum("bthm,bjhm->bhtj", p.qf, keys.kf)
    lw = lin_weight.float()
    o = torch.einsum("bhtj,bjhv->bthv", a + lw[:, None, None] * b, keys.v)
    if sinks is not None:
        o = o + (a_sinks @ _sink_values(sinks, 0)).transpose(1, 2)
    from_state = torch.einsum("bthm,bhmv->bthv", p.qf, p.state)
    return o + (lw * torch.exp(done.transpose(1, 2)))[..., None] * from_state


def _to_chunks(x: Tensor, window: int) -> Tensor:
    """[B, N*window, H, D] -> [B, H, N, window, D] (zero-padding the end)."""
    batch, length, heads = x.shape[:3]
    num_chunks = -(-length // window)
    x = F.pad(x, [0, 0, 0, 0, 0, num_chunks * window - length])
    return x.reshape(batch, num_chunks, window, heads, x.shape[-1]).movedim(3, 1)


def chunk_window_attention(
    q, k, v, q_feat, k_feat, log_decay, lin_weight, *, window=64, scale=None,
    initial_state=None, output_final_state=False, attention_mask=None, eps=1e-6, sinks=0,
) -> tuple[Tensor, dict | None]:
    """Chunks of size ``window``; a query in chunk c sees chunks c-1, c exactly and the rest via a state.

    An input no longer than the window takes the dense form instead (cost T x (T + buffered tokens)).

    Positions are counted in the sequence extended by the state's buffer (chunk 0), so query chunk c
    (c >= 1) at in-chunk offset i has: softmax over chunks c-1, c at offsets (i, i + window]; linear
    keys in chunk c-1 at offsets <= i with decay (i - offset); and the state R_{c-2} over chunks
    <= c-2, decayed to the last token of chunk c-2, times exp((i + 1) log_decay). Sinks: every query
    against all S of them, masked to those that have left its window.
    """
    p = prepare_window_inputs(q, k, v, q_feat, k_feat, log_decay, lin_weight, window, initial_state, attention_mask,
                              sinks)
    tokens = _cat(p.buffer, p.current)
    chosen = _select_sinks(p.sinks, tokens) if sinks else None
    seq_len = q.shape[1]
    if seq_len <= window:
        # Chunks of `window` would cost window^2 whatever T is (63 s for 32 tokens at window 8192). One dense
        # block costs T x (T + buffered tokens); a fresh state buffers none (its slots are all empty).
        empty_slots = window if initial_state is None else 0
        o = _dense_window(p, tokens, log_decay, lin_weight, _default_scale(q, scale), window, empty_slots, chosen)
        final = _final_state(p, tokens, log_decay, k, v, k_feat, chosen) if output_final_state else None
        return finish_outputs(o, True, p.mask, eps, v.dtype), final
    kc, kfc, vc = (_to_chunks(x, window) for x in tokens[:3])  # [B, H, N, window, *]
    maskc = _to_chunks(tokens.mask[:, :, None, None].float(), window).bool()  # [B, 1, N, window, 1]
    qc, qfc = _to_chunks(p.q, window), _to_chunks(p.qf, window)  # [B, H, N-1, window, *]

    def two_chunks(x: Tensor) -> Tensor:  # keys of chunks c-1 and c, for c = 1 .. N-1
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=-2)

    i = torch.arange(window, device=q.device)[:, None]
    j = torch.arange(2 * window, device=q.device)[None, :]
    in_window = (j > i) & (j <= i + window) & two_chunks(maskc).transpose(-1, -2)
    scores = _default_scale(q, scale) * (qc @ two_chunks(kc).transpose(-1, -2))
    sink_scores = sink_seen = None
    if chosen is not None:
        query_index = torch.arange(qc.shape[2] * window, device=q.device).view(qc.shape[2], window)
        sink_scores, sink_seen = _sink_scores(qc, chosen, _default_scale(q, scale), query_index)
    a, a_sinks = _softmax_weights(scores, in_window, sink_scores, sink_seen)
    o = a @ two_chunks(vc)
    if chosen is not None:
        o = o + a_sinks @ _sink_values(chosen, 1)

    # the steps of query chunk c - 1, cumulated within it: a key of chunk c - 1 at offset o joined at step o
    done = _to_chunks(p.log_decay[..., None], window).cumsum(dim=-2)  # [B, H, N-1, window, 1]: steps 0 .. i
    lin_exponent = torch.where(j[:, :window] <= i, done - done.transpose(-1, -2), float("-inf"))
    lin = (qfc @ kfc[:, :, :-1].transpose(-1, -2)) * torch.exp(lin_exponent)
    lin_o = lin @ vc[:, :, :-1]

    # chunk k's keys decayed to its last step; R_k from R_{k-1} by the whole chunk's steps
    to_chunk_end = torch.exp(done[:, :, :-1, -1:] - done[:, :, :-1])  # [B, H, N-2, window, 1]
    updates = (kfc[:, :, :-2] * to_chunk_end).transpose(-1, -2) @ vc[:, :, :-2]
    entering, last = chunk_states(torch.exp(done[:, :, :-1, -1, 0]), updates, p.state)  # decays [B, H, N-2]
    states = torch.cat([entering, last[:, :, None]], dim=2)  # R_{c-2} for c = 1 .. N-1
    lin_o = lin_o + torch.exp(done) * (qfc @ states)
    o = o + lin_weight.float()[:, None, None, None] * lin_o

    batch, heads = o.shape[:2]
    o = o.movedim(1, 3).reshape(batch, -1, heads, o.shape[-1])[:, :seq_len]
    final = _final_state(p, tokens, log_decay, k, v, k_feat, chosen) if output_final_state else None
    return finish_outputs(o, True, p.mask, eps, v.dtype), final


def recurrent_window_attention(
    q, k, v, q_feat, k_feat, log_decay, lin_weight, *, window=64, scale=None,
    initial_state=None, output_final_state=False, attention_mask=None, eps=1e-6, sinks=0,
) -> tuple[Tensor, dict | None]:
    """Token by token over a rolling buffer of the last ``window`` tokens (the decode path)."""
    p = prepare_window_inputs(q, k, v, q_feat, k_feat, log_decay, lin_weight, window, initial_state, attention_mask,
                              sinks)
    scale = _default_scale(q, scale)
    lw = lin_weight.float()[:, None]
    buffer, S, held = p.buffer, p.state, p.sinks
    outputs = []
    decays = torch.exp(p.log_decay)[..., None, None].unbind(dim=1)  # [B, H, 1, 1] a step
    for step in zip(p.q.unbind(dim=1), p.qf.unbind(dim=1), decays, *(x.unbind(dim=1) for x in p.current)):
        q_t, qf_t, decay, *token = step
        # the oldest buffered token leaves the window and is folded into S with weight 1
        S = decay * S + buffer.kf[:, 0, :, :, None] * buffer.v[:, 0, :, None, :]
        if held is not None:
            held = _keep_as_sink(held, buffer)
        buffer = Tokens(*(torch.cat([old[:, 1:], new[:, None]], dim=1) for old, new in zip(buffer, token)))
        scores = scale * torch.einsum("bhd,bwhd->bhw", q_t, buffer.k)
        sink_scores = None if held is None else scale * torch.einsum("bhd,bshd->bhs", q_t, held.k)
        a, a_sinks = _softmax_weights(scores, buffer.mask[:, None, :], sink_scores,
                                      None if held is None else held.mask[:, None, :])
        o_t = torch.einsum("bhw,bwhv->bhv", a, buffer.v) + lw * torch.einsum("bhm,bhmv->bhv", qf_t, S)
        if held is not None:
            o_t = o_t + torch.einsum("bhs,bshv->bhv", a_sinks, held.v)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1)
    final = _pack_state(S, buffer, k, v, k_feat, held) if output_final_state else None
    return finish_outputs(o, True, p.mask, eps, v.dtype), final


def _keep_as_sink(held: Sinks, buffer: Tokens) -> Sinks:
    """The oldest buffered token, leaving the window, takes the next free sink slot if it is real."""
    filled = held.mask.sum(dim=1, keepdim=True)
    slot = (torch.arange(held.mask.shape[1], device=filled.device)[None, :] == filled) & buffer.mask[:, :1]
    put = slot[:, :, None, None]
    return Sinks(torch.where(put, buffer.k[:, :1], held.k), torch.where(put, buffer.v[:, :1], held.v),
                 held.mask | slot, held.pos)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_feat: Tensor,
    k_feat: Tensor,
    log_decay: Tensor,
    lin_weight: Tensor,
    *,
    window: int = 64,
    scale: float | None = None,
    mode: str = "chunk",
    initial_state: dict | None = None,
    output_final_state: bool = False,
    attention_mask: Tensor | None = None,
    eps: float = 1e-6,
    sinks: int = 0,
) -> tuple[Tensor, dict | None]:
    """Exact softmax over the last ``window`` tokens (and the first ``sinks``) + decayed linear attention for
    older ones.

    Args:
        q, k: ``[B, T, H, d]`` raw (post-RoPE) queries/keys for the softmax part.
        v: ``[B, T, H, dv]``.
        q_feat, k_feat: ``[B, T, H, m]`` feature-mapped queries/keys for the linear part.
        log_decay: ``[H]`` or per token ``[B, T, H]`` (module docstring), <= 0. lin_weight: ``[H]``, > 0, scales
            the linear numerator and denominator.
        window: softmax window length (also the chunk size of ``mode="chunk"``).
        scale: softmax scale, default ``d ** -0.5``.
        mode: ``"parallel"`` (reference), ``"chunk"`` (O(T * window)) or ``"recurrent"`` (decode).
        initial_state / output_final_state: the state dict described in the module docstring;
            carrying it across calls (any split, any modes) equals one long call.
        attention_mask: ``[B, T]``, 1/True for real tokens.
        sinks: how many of the first real tokens stay softmax keys after they leave the window (module
            docstring); their keys and values are part of the state.

    Returns:
        ``(o [B, T, H, dv] in v.dtype, state dict or None)``. Accumulation is float32.
    """
    forms = {
        "parallel": naive_window_attention,
        "chunk": chunk_window_attention,
        "recurrent": recurrent_window_attention,
    }
    if mode not in forms:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return forms[mode](
        q, k, v, q_feat, k_feat, log_decay, lin_weight, window=window, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state,
        attention_mask=attention_mask, eps=eps, sinks=sinks,
    )
