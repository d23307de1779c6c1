"""One decode step of the window hybrid as one Triton kernel (the fast decode path's window layers on CUDA).

Same arithmetic as ``window_attention(mode="recurrent")`` for one token, over a *ring buffer*: the last
``window`` tokens live in ``state["k"]``, ``["v"]``, ``["kf"]`` ([B, W, H, .]) and ``state["mask"]`` ([B, W]),
and the token at slot ``ring % W`` is the oldest. One program per (batch, head):

1. the oldest token leaves the window: S <- decay S + real * phi(k_old) [v_old, 1]  (S: [B, H, m, dv + 1]);
2. the new token takes its slot;
3. o = (sum_w a_w [v_w, 1] + lw * phi(q) S), a_w = exp(s_w - max s) over the real slots, s_w = scale q.k_w;
   out = o[:dv] / (o[dv] + eps).

With attention sinks (``state["sink_k"]``, ``["sink_v"]`` [B, S, H, .], ``["sink_mask"]`` [B, S]): the first S
real tokens to leave the window stay softmax keys, inside the same max and denominator (``window_attention``'s
``sinks``). A token leaving in step 1 while fewer than S sinks are held becomes the next one, in this step already.

The mask rows are shared by the heads (and, in the fast decoder, by the layers), so the caller advances them once
every program has read them: ``advance_masks``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_dijiang import HAS_TRITON, launch, triton

if HAS_TRITON:
    from .triton_dijiang import tl

__all__ = ["advance_masks", "window_decode_step", "window_decode_supported"]

NUM_WARPS = 4  # benchmarks/bench_window_decode.py times the alternatives


if HAS_TRITON:

    @triton.jit
    def _window_decode_step(q_ptr, k_ptr, v_ptr, qf_ptr, kf_ptr, kb_ptr, vb_ptr, kfb_ptr, mask_ptr, s_ptr, ring_ptr,
                            decay_ptr, lw_ptr, o_ptr, sk_ptr, sv_ptr, smask_ptr, H, scale, eps,
                            W: tl.constexpr, WP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                            M: tl.constexpr, SNK: tl.constexpr, SP: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        ar_w = tl.arange(0, WP)
        ar_d = tl.arange(0, D)
        ar_v = tl.arange(0, DV)
        ar_m = tl.arange(0, M)
        slot = tl.load(ring_ptr) % W
        wv = ar_w < W
        is_slot = ar_w == slot
        # this token
        bh64 = bh.to(tl.int64)
        qx = tl.load(q_ptr + bh64 * D + ar_d).to(tl.float32)
        kx = tl.load(k_ptr + bh64 * D + ar_d)
        vx = tl.load(v_ptr + bh64 * DV + ar_v)
        qfx = tl.load(qf_ptr + bh64 * M + ar_m).to(tl.float32)
        kfx = tl.load(kf_ptr + bh64 * M + ar_m)
        # the window of head h: rows ((b * W + w) * H + h) of the [B, W, H, .] buffers
        row = (b.to(tl.int64) * W + ar_w) * H + h
        kb = tl.load(kb_ptr + row[:, None] * D + ar_d[None, :], mask=wv[:, None], other=0.0).to(tl.float32)
        vb = tl.load(vb_ptr + row[:, None] * DV + ar_v[None, :], mask=wv[:, None], other=0.0).to(tl.float32)
        kfb = tl.load(kfb_ptr + row[:, None] * M + ar_m[None, :], mask=wv[:, None], other=0.0).to(tl.float32)
        real = tl.load(mask_ptr + b.to(tl.int64) * W + ar_w, mask=wv, other=0).to(tl.float32)
        # 1. the oldest token leaves the window (nothing if it was padding)
        real_old = tl.sum(tl.where(is_slot, real, 0.0), axis=0)
        kf_old = tl.sum(tl.where(is_slot[:, None], kfb, 0.0), axis=0) * real_old
        v_old = tl.sum(tl.where(is_slot[:, None], vb, 0.0), axis=0)
        if SNK > 0:  # the sinks, the leaving token among them if it is one of the first SNK real tokens to leave
            k_old = tl.sum(tl.where(is_slot[:, None], kb, 0.0), axis=0)
            ar_s = tl.arange(0, SP)
            sv_ok = ar_s < SNK
            held = tl.load(smask_ptr + b.to(tl.int64) * SNK + ar_s, mask=sv_ok, other=0) > 0
            count = tl.sum(held.to(tl.int32), axis=0)  # sinks fill in order: the next one goes to slot `count`
            join_slot = tl.where(real_old > 0, count, SNK)  # SNK: it does not join (padding, or all SNK held)
            is_new = (ar_s == join_slot) & sv_ok
            srows = (b.to(tl.int64) * SNK + ar_s) * H + h
            sk = tl.load(sk_ptr + srows[:, None] * D + ar_d[None, :], mask=sv_ok[:, None], other=0.0).to(tl.float32)
            sv = tl.load(sv_ptr + srows[:, None] * DV + ar_v[None, :], mask=sv_ok[:, None], other=0.0).to(tl.float32)
            sk = tl.where(is_new[:, None], k_old[None, :], sk)
            sv = tl.where(is_new[:, None], v_old[None, :], sv)
            sink_seen = sv_ok & (held | is_new)
            sink_scores = tl.where(sink_seen, tl.sum(sk * qx[None, :], axis=1) * scale, float("-inf"))
            new_row = (b.to(tl.int64) * SNK + join_slot) * H + h
            tl.store(sk_ptr + new_row * D + ar_d, k_old.to(sk_ptr.dtype.element_ty), mask=ar_d * 0 + join_slot < SNK)
            tl.store(sv_ptr + new_row * DV + ar_v, v_old.to(sv_ptr.dtype.element_ty), mask=ar_v * 0 + join_slot < SNK)
        decay = tl.load(decay_ptr + h)
        s_off = bh64 * M * (DV + 1) + ar_m * (DV + 1)
        S = tl.load(s_ptr + s_off[:, None] + ar_v[None, :])
        z = tl.load(s_ptr + s_off + DV)
        S = decay * S + kf_old[:, None] * v_old[None, :]
        z = decay * z + kf_old
        # 2. the new token takes the slot
        kb = tl.where(is_slot[:, None], kx.to(tl.float32)[None, :], kb)
        vb = tl.where(is_slot[:, None], vx.to(tl.float32)[None, :], vb)
        allowed = wv & (is_slot | (real > 0))
        # 3. softmax over the window (unnormalised) plus the linear readout, one shared denominator
        scores = tl.where(allowed, tl.sum(kb * qx[None, :], axis=1) * scale, float("-inf"))
        top = tl.max(scores, axis=0)
        if SNK > 0:
            top = tl.maximum(top, tl.max(sink_scores, axis=0))
        p = tl.where(allowed, tl.exp(scores - top), 0.0)
        lw = tl.load(lw_ptr + h)
        num = tl.sum(p[:, None] * vb, axis=0) + lw * tl.sum(qfx[:, None] * S, axis=0)
        den = tl.sum(p, axis=0) + lw * tl.sum(qfx * z, axis=0)
        if SNK > 0:
            p_sink = tl.where(sink_seen, tl.exp(sink_scores - top), 0.0)
            num += tl.sum(p_sink[:, None] * sv, axis=0)
            den += tl.sum(p_sink, axis=0)
        tl.store(o_ptr + bh64 * DV + ar_v, (num / (den + eps)).to(o_ptr.dtype.element_ty))
        tl.store(s_ptr + s_off[:, None] + ar_v[None, :], S)
        tl.store(s_ptr + s_off + DV, z)
        srow = (b.to(tl.int64) * W + slot) * H + h
        tl.store(kb_ptr + srow * D + ar_d, kx)
        tl.store(vb_ptr + srow * DV + ar_v, vx)
        tl.store(kfb_ptr + srow * M + ar_m, kfx)


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def window_decode_supported(head_dim: int, value_dim: int, num_features: int, window: int, device) -> bool:
    """Power-of-two head sizes of at least 16 on CUDA with Triton; windows up to 1024 (one register tile)."""
    sizes_ok = all(x >= 16 and x & (x - 1) == 0 for x in (head_dim, value_dim, num_features))
    return HAS_TRITON and torch.device(device).type == "cuda" and sizes_ok and 1 <= window <= 1024


def window_decode_step(q: Tensor, k: Tensor, v: Tensor, q_feat: Tensor, k_feat: Tensor, state: dict, ring: Tensor,
                       decay: Tensor, lin_weight: Tensor, *, scale: float, eps: float = 1e-6) -> Tensor:
    """One token: q, k [B, H, d], v [B, H, dv], q_feat, k_feat [B, H, m] (k already expanded to H heads);
    ``state``: "k", "v", "kf" [B, W, H, .] in the token dtypes, "mask" [B, W] bool, "S" [B, H, m, dv + 1] float32,
    and with sinks "sink_k", "sink_v" [B, S, H, .], "sink_mask" [B, S] bool (held in order); updated in place
    except the masks (the caller calls ``advance_masks`` afterwards); ``ring``: [1] long, steps since the buffers
    held the window oldest-first; decay, lin_weight: [H] float32. Returns o [B, H, dv] in v's dtype."""
    q, k, v, q_feat, k_feat = (t.contiguous() for t in (q, k, v, q_feat, k_feat))  # the kernel's addressing
    B, H, d = q.shape
    W = state["k"].shape[1]
    dv, m = v.shape[-1], q_feat.shape[-1]
    o = torch.empty_like(v)
    sinks = state["sink_k"].shape[1] if "sink_k" in state else 0
    # without sinks the kernel compiles their branch out and never touches these stand-ins
    sink_k, sink_v, sink_mask = ((state["sink_k"], state["sink_v"], state["sink_mask"].view(torch.int8)) if sinks
                                 else (state["k"], state["v"], state["mask"].view(torch.int8)))
    args = (q, k, v, q_feat, k_feat, state["k"], state["v"], state["kf"], state["mask"].view(torch.int8), state["S"],
            ring, decay, lin_weight, o, sink_k, sink_v, sink_mask, H, float(scale), float(eps))
    # generic launch key: the step is captured in a CUDA graph once, so this host path is not hot
    launch(_window_decode_step, (B * H,), args, dict(W=W, WP=_pow2(W), D=d, DV=dv, M=m, SNK=sinks, SP=_pow2(sinks)),
           num_warps=NUM_WARPS)
    return o


def advance_masks(mask: Tensor, ring: Tensor, sink_mask: Tensor | None = None) -> None:
    """After every ``window_decode_step`` of a step has read them: the token that left slot ``ring % W`` becomes
    the next sink if it was real and fewer than S are held, then the new token's slot is real. In place, with
    tensor ops only (CUDA-graph safe)."""
    slot = torch.remainder(ring, mask.shape[1])
    if sink_mask is not None:
        left = mask.index_select(1, slot)  # [B, 1]: the token that left was real
        held = sink_mask.sum(dim=1, keepdim=True)
        place = torch.arange(sink_mask.shape[1], device=sink_mask.device)[None, :]
        sink_mask |= left & (place == held)
    mask.index_fill_(1, slot, True)
