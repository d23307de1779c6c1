"""The window hybrid on the GPU: exact softmax over the last ``window`` tokens (a banded Triton kernel,
FlashAttention style) plus DiJiang beyond it (the fused kernel of ``triton_dijiang``, feature map inside).

Same result as ``dijiang.ops.window_attention`` with ``q_feat = phi(q)``, ``k_feat = phi(k)`` (see
``ops/window.py`` for the formula). Two pieces:

linear part   keys j <= t - window with decay (t - window - j): ordinary causal decayed linear attention
              between the queries shifted left by ``window`` and the keys, so the fused DiJiang kernel
              computes it in one normalised call that also returns its denominator D (float32, over
              T - window rows); the numerator is N = o * (D + eps).
band part     one Triton program per block of 64 queries walks the <= window + 63 keys of its band with an
              online softmax, then combines:  o = (A + lw N) / (Da + lw D + eps),  where
              A = sum_band exp(s_j - mx) v_j, Da = sum_band exp(s_j - mx), mx = the band's max score.

Attention sinks (``sinks=S``): tokens 0 .. S - 1 are softmax keys of every row t once they are out of its band
(j <= t - window). Each program walks their one block of SB = 64 keys (S <= 64) before its band,
inside the same online softmax (max, arg-max and denominator over band and sinks together); in the backward,
dq takes the same block, and one more kernel sums the sinks' dk, dv over all query blocks (one partial per block,
added up in torch: the sinks are the only keys every row sees).

The reference subtracts the band's max before exponentiating and lets the gradient flow through that
max, so it is part of the function: dL/dmx = lw (g.N + dDa D) + eps dDa (g = do / den, dDa = -(do.o) / den)
goes to the score of the arg-max key, whose index the forward stores. (Ties: torch splits among equal
maxima, this kernel gives it to the first; they do not happen with real-valued activations.)

A per-token decay (``log_decay`` [B, T, H], a data-dependent gate) goes to the fused DiJiang kernel as the
shifted rows' steps: row r of the linear part is query r + window, whose step decays what left the window before it.

Scope: no padding mask and no initial state (training and a first prefill); the layer sends those calls
to the PyTorch op. The final state (for generation after a prefill) is assembled from the two linear
calls' final states and the last ``window`` raw tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .triton_dijiang import (HAS_TRITON, check_decay_shape, dijiang_feature_map, fused_dijiang_with_denominator,
                             launch, triton, triton_supported)

if HAS_TRITON:
    from .triton_dijiang import tl

__all__ = ["fused_window_attention"]

BLOCK = 64  # queries per program and keys per step
MAX_SINKS = 64  # the sinks fit the kernels' one key block (BLOCK); DiJiangSettings and the demo take this bound
LIN_EPS = 1e-6  # the linear call's own eps; N = o * (D + eps) undoes it exactly


if HAS_TRITON:

    @triton.jit
    def _offsets(tok, idx, H, WIDTH: tl.constexpr):
        """Element offsets of tokens ``idx`` of one (batch, head) in a [B, T, H, WIDTH] tensor."""
        return (tok + idx[:, None] * H) * WIDTH + tl.arange(0, WIDTH)[None, :]

    @triton.jit
    def _band_keys(t0, T, W, BM: tl.constexpr, BN: tl.constexpr):
        """[lo, hi) of the key blocks that queries t0 .. t0 + BM - 1 see."""
        return (tl.maximum(t0 - W + 1, 0) // BN) * BN, tl.minimum(t0 + BM, T)

    @triton.jit
    def _linear_rows(b, bh, rows, rvalid, T, H, W, DV: tl.constexpr):
        """Row t reads the linear sums of shifted row t - W: offsets into N [B, T - W, H, DV], D [B*H, T - W]."""
        lrow = rows - W
        lvalid = rvalid & (lrow >= 0)
        n_off = _offsets(b.to(tl.int64) * (T - W) * H + (bh % H), lrow, H, DV)
        d_off = bh.to(tl.int64) * (T - W) + lrow
        return n_off, d_off, lvalid

    @triton.jit
    def _program_block(H, T, BM: tl.constexpr):
        """This program's (batch, head) and block of BM tokens: b, h, bh, t0, rows, rvalid, tok."""
        bh = tl.program_id(1)
        b = bh // H
        t0 = tl.program_id(0) * BM
        rows = t0 + tl.arange(0, BM)
        return b, bh % H, bh, t0, rows, rows < T, b.to(tl.int64) * T * H + bh % H

    @triton.jit
    def _key_block(k_ptr, v_ptr, tok, js, T, H, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr):
        """Keys js .. js + BN - 1 and their values (zero past T)."""
        cols = js + tl.arange(0, BN)
        cvalid = cols < T
        kx = tl.load(k_ptr + _offsets(tok, cols, H, D), mask=cvalid[:, None], other=0.0)
        vx = tl.load(v_ptr + _offsets(tok, cols, H, DV), mask=cvalid[:, None], other=0.0)
        return cols, cvalid, kx, vx

    @triton.jit
    def _scores(q, kx, rows, cols, T, W, scale, PREC: tl.constexpr):
        """Scaled band scores [BM, BN] and which of them are in the band (key in (t - W, t], inside T)."""
        s = tl.dot(q, tl.trans(kx), input_precision=PREC) * scale
        allowed = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - W) & (cols[None, :] < T)
        return s, allowed

    @triton.jit
    def _sink_scores(q, kx, rows, cols, W, S, scale, PREC: tl.constexpr):
        """Scaled scores [BM, SB] against the sink block and which of them row t sees (key j < S, j <= t - W)."""
        s = tl.dot(q, tl.trans(kx), input_precision=PREC) * scale
        allowed = (cols[None, :] < S) & (cols[None, :] <= rows[:, None] - W)
        return s, allowed

    @triton.jit
    def _online_step(s, allowed, vx, js, m_i, l_i, acc, arg, DT: tl.constexpr, PREC: tl.constexpr):
        """One block of keys into the online softmax: running max (and its key), denominator, numerator."""
        s = tl.where(allowed, s, float("-inf"))
        block_max = tl.max(s, axis=1)
        block_arg = tl.argmax(s, axis=1)
        m_new = tl.maximum(m_i, block_max)
        arg = tl.where(block_max > m_i, js + block_arg, arg)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vx, input_precision=PREC)
        return m_new, l_i, acc, arg

    @triton.jit
    def _band_grads(s, allowed, vx, gb, cols, mx, dda, dmx, arg, PREC: tl.constexpr):
        """Probabilities p = exp(s - mx) of a block of keys and dL/ds, the arg-max key taking dL/dmx as well."""
        p = tl.where(allowed, tl.exp(s - mx[:, None]), 0.0)
        dp = tl.dot(gb, tl.trans(vx), input_precision=PREC) + dda[:, None]
        ds = p * dp + tl.where(allowed & (cols[None, :] == arg[:, None]), dmx[:, None], 0.0)
        return p, ds

    @triton.jit
    def _query_rows(q_ptr, do_ptr, mx_ptr, den_ptr, idx_ptr, dda_ptr, dmx_ptr, tok, bh, rows, rvalid, T, H,
                    D: tl.constexpr, DV: tl.constexpr):
        """A block of queries as the dk/dv kernels read it: q, do / den (float32) and the per-row max score, its
        key, dDa and dL/dmx (the last two from the dq kernel); zeros past T."""
        row_off = bh.to(tl.int64) * T + rows
        q = tl.load(q_ptr + _offsets(tok, rows, H, D), mask=rvalid[:, None], other=0.0)
        do = tl.load(do_ptr + _offsets(tok, rows, H, DV), mask=rvalid[:, None], other=0.0).to(tl.float32)
        den = tl.load(den_ptr + row_off, mask=rvalid, other=1.0)
        mx = tl.load(mx_ptr + row_off, mask=rvalid, other=0.0)
        arg = tl.load(idx_ptr + row_off, mask=rvalid, other=-1)
        dda = tl.load(dda_ptr + row_off, mask=rvalid, other=0.0)
        dmx = tl.load(dmx_ptr + row_off, mask=rvalid, other=0.0)
        return q, do / den[:, None], mx, arg, dda, dmx

    @triton.jit
    def _band_forward(
        q_ptr, k_ptr, v_ptr, n_ptr, d_ptr, lw_ptr, o_ptr, mx_ptr, den_ptr, idx_ptr,
        T, H, W, S, scale, eps,
        D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_LIN: tl.constexpr,
        PREC: tl.constexpr, SB: tl.constexpr,
    ):
        b, h, bh, t0, rows, rvalid, tok = _program_block(H, T, BM)
        DT = v_ptr.dtype.element_ty
        q = tl.load(q_ptr + _offsets(tok, rows, H, D), mask=rvalid[:, None], other=0.0)
        m_i = tl.full([BM], -1.0e30, tl.float32)  # finite: a row with no key yet must not give inf - inf
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, DV], dtype=tl.float32)
        arg = tl.zeros([BM], dtype=tl.int32)
        if SB > 0:
            cols, cvalid, kx, vx = _key_block(k_ptr, v_ptr, tok, 0, T, H, D, DV, SB)
            s, allowed = _sink_scores(q, kx, rows, cols, W, S, scale, PREC)
            m_i, l_i, acc, arg = _online_step(s, allowed, vx, 0, m_i, l_i, acc, arg, DT, PREC)
        lo, hi = _band_keys(t0, T, W, BM, BN)
        for js in range(lo, hi, BN):
            cols, cvalid, kx, vx = _key_block(k_ptr, v_ptr, tok, js, T, H, D, DV, BN)
            s, allowed = _scores(q, kx, rows, cols, T, W, scale, PREC)
            m_i, l_i, acc, arg = _online_step(s, allowed, vx, js, m_i, l_i, acc, arg, DT, PREC)
        lw = tl.load(lw_ptr + h)
        num = acc
        den = l_i + eps
        if HAS_LIN:
            n_off, d_off, lvalid = _linear_rows(b, bh, rows, rvalid, T, H, W, DV)
            num += lw * tl.load(n_ptr + n_off, mask=lvalid[:, None], other=0.0)
            den += lw * tl.load(d_ptr + d_off, mask=lvalid, other=0.0)
        o = num / den[:, None]
        tl.store(o_ptr + _offsets(tok, rows, H, DV), o.to(o_ptr.dtype.element_ty), mask=rvalid[:, None])
        row_off = bh.to(tl.int64) * T + rows
        tl.store(mx_ptr + row_off, m_i, mask=rvalid)
        tl.store(den_ptr + row_off, den, mask=rvalid)
        tl.store(idx_ptr + row_off, arg, mask=rvalid)

    @triton.jit
    def _band_backward_dq(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, n_ptr, d_ptr, lw_ptr, mx_ptr, den_ptr, idx_ptr,
        dq_ptr, dn_ptr, dd_ptr, dlw_ptr, dda_ptr, dmx_ptr,
        T, H, W, S, scale, eps,
        D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_LIN: tl.constexpr,
        PREC: tl.constexpr, SB: tl.constexpr,
    ):
        """dq, the per-row scalars the dk/dv kernel needs (dDa, dmx), and the linear sums' gradients."""
        b, h, bh, t0, rows, rvalid, tok = _program_block(H, T, BM)
        DT = v_ptr.dtype.element_ty
        row_off = bh.to(tl.int64) * T + rows
        voff = _offsets(tok, rows, H, DV)
        q = tl.load(q_ptr + _offsets(tok, rows, H, D), mask=rvalid[:, None], other=0.0)
        do = tl.load(do_ptr + voff, mask=rvalid[:, None], other=0.0).to(tl.float32)
        o = tl.load(o_ptr + voff, mask=rvalid[:, None], other=0.0).to(tl.float32)
        den = tl.load(den_ptr + row_off, mask=rvalid, other=1.0)
        mx = tl.load(mx_ptr + row_off, mask=rvalid, other=0.0)
        arg = tl.load(idx_ptr + row_off, mask=rvalid, other=-1)
        lw = tl.load(lw_ptr + h)
        g = do / den[:, None]
        dda = -tl.sum(do * o, axis=1) / den
        dmx = eps * dda
        if HAS_LIN:
            n_off, d_off, lvalid = _linear_rows(b, bh, rows, rvalid, T, H, W, DV)
            n = tl.load(n_ptr + n_off, mask=lvalid[:, None], other=0.0)
            dl = tl.load(d_ptr + d_off, mask=lvalid, other=0.0)
            dlw = tl.sum(g * n, axis=1) + dda * dl
            dmx += lw * dlw
            tl.store(dn_ptr + n_off, lw * g, mask=lvalid[:, None])
            tl.store(dd_ptr + d_off, lw * dda, mask=lvalid)
            tl.store(dlw_ptr + row_off, dlw, mask=rvalid)
        tl.store(dda_ptr + row_off, dda, mask=rvalid)
        tl.store(dmx_ptr + row_off, dmx, mask=rvalid)
        gb = g.to(DT)
        dq = tl.zeros([BM, D], dtype=tl.float32)
        if SB > 0:
            cols, cvalid, kx, vx = _key_block(k_ptr, v_ptr, tok, 0, T, H, D, DV, SB)
            s, allowed = _sink_scores(q, kx, rows, cols, W, S, scale, PREC)
            p, ds = _band_grads(s, allowed, vx, gb, cols, mx, dda, dmx, arg, PREC)
            dq += tl.dot(ds.to(DT), kx, input_precision=PREC)
        lo, hi = _band_keys(t0, T, W, BM, BN)
        for js in range(lo, hi, BN):
            cols, cvalid, kx, vx = _key_block(k_ptr, v_ptr, tok, js, T, H, D, DV, BN)
            s, allowed = _scores(q, kx, rows, cols, T, W, scale, PREC)
            p, ds = _band_grads(s, allowed, vx, gb, cols, mx, dda, dmx, arg, PREC)
            dq += tl.dot(ds.to(DT), kx, input_precision=PREC)
        tl.store(dq_ptr + _offsets(tok, rows, H, D), (dq * scale).to(dq_ptr.dtype.element_ty), mask=rvalid[:, None])

    @triton.jit
    def _band_backward_dkdv(
        q_ptr, k_ptr, v_ptr, do_ptr, mx_ptr, den_ptr, idx_ptr, dda_ptr, dmx_ptr, dk_ptr, dv_ptr,
        T, H, W, scale,
        D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    ):
        """One program per block of keys; walks the queries whose band holds them (t in [j, j + W))."""
        b, h, bh, js, _, _, tok = _program_block(H, T, BN)
        DT = v_ptr.dtype.element_ty
        cols, cvalid, kx, vx = _key_block(k_ptr, v_ptr, tok, js, T, H, D, DV, BN)
        dk = tl.zeros([BN, D], dtype=tl.float32)
        dv = tl.zeros([BN, DV], dtype=tl.float32)
        lo = (js // BM) * BM
        hi = tl.minimum(js + BN - 1 + W, T)
        for ts in range(lo, hi, BM):
            rows = ts + tl.arange(0, BM)
            q, g, mx, arg, dda, dmx = _query_rows(q_ptr, do_ptr, mx_ptr, den_ptr, idx_ptr, dda_ptr, dmx_ptr, tok, bh,
                                                  rows, rows < T, T, H, D, DV)
            gb = g.to(DT)
            s, allowed = _scores(q, kx, rows, cols, T, W, scale, PREC)
            p, ds = _band_grads(s, allowed, vx, gb, cols, mx, dda, dmx, arg, PREC)
            dv += tl.dot(tl.trans(p.to(DT)), gb, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(DT)), q, input_precision=PREC)
        tl.store(dk_ptr + _offsets(tok, cols, H, D), (dk * scale).to(dk_ptr.dtype.element_ty), mask=cvalid[:, None])
        tl.store(dv_ptr + _offsets(tok, cols, H, DV), dv.to(dv_ptr.dtype.element_ty), mask=cvalid[:, None])

    @triton.jit
    def _sink_backward_dkdv(
        q_ptr, k_ptr, v_ptr, do_ptr, mx_ptr, den_ptr, idx_ptr, dda_ptr, dmx_ptr, pdk_ptr, pdv_ptr,
        T, H, W, S, scale,
        D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, SB: tl.constexpr, PREC: tl.constexpr,
    ):
        """The sinks' dk, dv from one block of queries, into its own slot of the partials [B*H, blocks, SB, .]."""
        b, h, bh, t0, rows, rvalid, tok = _program_block(H, T, BM)
        DT = v_ptr.dtype.element_ty
        cols, cvalid, kx, vx = _key_block(k_ptr, v_ptr, tok, 0, T, H, D, DV, SB)
        q, g, mx, arg, dda, dmx = _query_rows(q_ptr, do_ptr, mx_ptr, den_ptr, idx_ptr, dda_ptr, dmx_ptr, tok, bh,
                                              rows, rvalid, T, H, D, DV)
        gb = g.to(DT)
        s, allowed = _sink_scores(q, kx, rows, cols, W, S, scale, PREC)
        p, ds = _band_grads(s, allowed & rvalid[:, None], vx, gb, cols, mx, dda, dmx, arg, PREC)
        dk = tl.dot(tl.trans(ds.to(DT)), q, input_precision=PREC) * scale
        dv = tl.dot(tl.trans(p.to(DT)), gb, input_precision=PREC)
        part = (bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * SB
        slots = part + tl.arange(0, SB)[:, None]
        tl.store(pdk_ptr + slots * D + tl.arange(0, D)[None, :], dk)
        tl.store(pdv_ptr + slots * DV + tl.arange(0, DV)[None, :], dv)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _WindowBand(torch.autograd.Function):
    """o = (band softmax numerator + lw N) / (band denominator + lw D + eps); N [B, T - W, H, dv] and
    D [B * H, T - W] are the linear sums of rows W .. T - 1."""

    @staticmethod
    def forward(ctx, q, k, v, lin_num, lin_den, lin_weight, window, scale, eps, sinks):
        B, T, H, d = q.shape
        dv = v.shape[-1]
        has_lin = lin_num.shape[1] > 0  # T > window, unless the caller left the linear part out
        o = torch.empty_like(v)
        mx = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        den = torch.empty_like(mx)
        idx = torch.empty(B * H, T, device=q.device, dtype=torch.int32)
        grid = (triton.cdiv(T, BLOCK), B * H)
        launch(_band_forward, grid, (q, k, v, lin_num if has_lin else o, lin_den if has_lin else mx, lin_weight, o, mx,
                                     den, idx, T, H, window, sinks, scale, eps),
               dict(D=d, DV=dv, BM=BLOCK, BN=BLOCK, HAS_LIN=has_lin, PREC=_precision(q.dtype),
                    SB=_sink_block(sinks, T, window)), num_warps=4)
        ctx.save_for_backward(q, k, v, lin_num, lin_den, lin_weight, o, mx, den, idx)
        ctx.window, ctx.scale, ctx.eps, ctx.sinks = window, scale, eps, sinks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, lin_num, lin_den, lin_weight, o, mx, den, idx = ctx.saved_tensors
        B, T, H, d = q.shape
        dv_dim = v.shape[-1]
        window = ctx.window
        has_lin = lin_num.shape[1] > 0
        do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_num, d_den = torch.empty_like(lin_num), torch.empty_like(lin_den)  # every shifted row is written
        d_lw_rows = torch.zeros(B * H, T, device=q.device, dtype=torch.float32)
        dda, dmx = torch.empty_like(mx), torch.empty_like(mx)
        grid = (triton.cdiv(T, BLOCK), B * H)
        prec = _precision(q.dtype)
        sinks, sink_block = ctx.sinks, _sink_block(ctx.sinks, T, window)
        launch(_band_backward_dq, grid,
               (q, k, v, o, do, lin_num if has_lin else mx, lin_den if has_lin else mx, lin_weight, mx, den, idx,
                dq, d_num if has_lin else dda, d_den if has_lin else dda, d_lw_rows, dda, dmx,
                T, H, window, sinks, ctx.scale, ctx.eps),
               dict(D=d, DV=dv_dim, BM=BLOCK, BN=BLOCK, HAS_LIN=has_lin, PREC=prec, SB=sink_block), num_warps=4)
        launch(_band_backward_dkdv, grid, (q, k, v, do, mx, den, idx, dda, dmx, dk, dv, T, H, window, ctx.scale),
               dict(D=d, DV=dv_dim, BM=BLOCK, BN=BLOCK, PREC=prec), num_warps=4)
        if sink_block:
            part_dk = torch.empty(B * H, grid[0], sink_block, d, device=q.device, dtype=torch.float32)
            part_dv = torch.empty(B * H, grid[0], sink_block, dv_dim, device=q.device, dtype=torch.float32)
            launch(_sink_backward_dkdv, grid, (q, k, v, do, mx, den, idx, dda, dmx, part_dk, part_dv, T, H, window,
                                               sinks, ctx.scale),
                   dict(D=d, DV=dv_dim, BM=BLOCK, SB=sink_block, PREC=prec), num_warps=4)
            held = min(sinks, T)
            for grad, part in ((dk, part_dk), (dv, part_dv)):
                from_rows = part.sum(dim=1).view(B, H, sink_block, -1).transpose(1, 2)[:, :held]
                grad[:, :held] = (grad[:, :held].float() + from_rows).to(grad.dtype)
        d_lw = d_lw_rows.view(B, H, T).sum(dim=(0, 2))
        return dq, dk, dv, d_num, d_den, d_lw, None, None, None, None


def _sink_block(sinks: int, T: int, window: int) -> int:
    """Keys in the sink block (0: no sink leaves the band in this call). One block of BLOCK keys whatever S is:
    the band loop re-binds the sink block's ``cols``, and Triton's compiler refuses a loop-carried variable whose
    shape changes (a 16-key block failed so on the H200; the interpreter does not check it)."""
    if not sinks or T <= window:
        return 0
    return BLOCK


def _final_state(k, v, k_last_feat, lin_state, window, m, sinks=0):
    """The ``window_attention`` state after this call (no initial state): S from the linear call (its
    normaliser column included), the last ``window`` raw tokens (oldest first, zero-padded in front when
    T < window), and the sinks that have left the window (tokens 0 .. T - window - 1, at most ``sinks``)."""
    B, T, H, d = k.shape
    dv = v.shape[-1]
    S = k.new_zeros(B, H, m, dv + 1, dtype=torch.float32) if lin_state is None else lin_state
    kept = min(T, window)
    pad = window - kept
    mask = torch.zeros(B, window, dtype=torch.bool, device=k.device)
    mask[:, pad:] = True
    state = {
        "S": S,
        "k": F.pad(k[:, T - kept:], [0, 0, 0, 0, pad, 0]),
        "v": F.pad(v[:, T - kept:], [0, 0, 0, 0, pad, 0]),
        "kf": F.pad(k_last_feat, [0, 0, 0, 0, pad, 0]),
        "mask": mask,
    }
    if sinks:
        left = min(sinks, max(T - window, 0))
        sink_mask = torch.zeros(B, sinks, dtype=torch.bool, device=k.device)
        sink_mask[:, :left] = True
        state.update(sink_k=F.pad(k[:, :left], [0, 0, 0, 0, 0, sinks - left]),
                     sink_v=F.pad(v[:, :left], [0, 0, 0, 0, 0, sinks - left]), sink_mask=sink_mask)
    return state


def fused_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj: Tensor | None,
    log_weight: Tensor | None,
    log_decay: Tensor,
    lin_weight: Tensor,
    *,
    window: int,
    scale: float | None = None,
    feature_scale: float | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    q_lin: Tensor | None = None,
    k_lin: Tensor | None = None,
    sinks: int = 0,
    linear: bool = True,
) -> tuple[Tensor, dict | None]:
    """Window hybrid with the DiJiang softmax feature map ``phi(x) = softmax(sqrt(feature_scale) x P + log_weight)``.

    Args:
        q, k: ``[B, T, H, d]`` post-RoPE queries/keys (kv heads already expanded). v: ``[B, T, H, dv]``.
        proj: ``[d_lin, m]`` frozen projection (d_lin: q_lin's width, d without q_lin); may be None with
            ``linear=False``. log_weight: ``[H, m]`` or None. log_decay: ``[H]``, or per token
            ``[B, T, H]`` (module docstring), <= 0.
        lin_weight: ``[H]`` (> 0), the linear part's weight. window: softmax band length.
        scale: softmax scale (default ``d ** -0.5``); feature_scale: the feature map's (default the same).
        q_lin, k_lin: what the linear part's feature map sees, if not q, k (``[B, T, H, d_lin]``; e.g. a learned
            per-head transform of them, or a learned map's log-features with an identity proj); the softmax band
            always uses q, k.
        sinks: tokens 0 .. sinks - 1 stay softmax keys of every row once out of its band (at most 64).
        linear: False leaves the linear part out: the band softmax (and sinks) alone, the state's S and kf of
            width 0 (a layer that adds another branch beside the window: ``state_update="delta"``); proj, log_weight,
            q_lin and k_lin are then not read.

    Returns ``(o [B, T, H, dv] in v.dtype, state dict or None)`` as ``window_attention``; gradients flow to
    q, k, v, log_weight, log_decay and lin_weight. CUDA (or the Triton interpreter) only.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= MAX_SINKS:
        raise ValueError(f"sinks must be an int in [0, {MAX_SINKS}] on the fused path, got {sinks!r}")
    B, T, H, d = q.shape
    if lin_weight.shape != (H,):
        raise ValueError(f"lin_weight must have shape [H] = [{H}], got {tuple(lin_weight.shape)}")
    check_decay_shape(log_decay, B, T, H)  # before it is sliced for the linear part
    if linear and proj is None:
        raise ValueError("the linear part needs its projection: pass proj, or linear=False")
    ok, why = triton_supported(q, k, v, proj if linear else None)
    if not ok:
        raise ValueError(f"fused window attention cannot run: {why}")
    scale = d**-0.5 if scale is None else float(scale)
    feature_scale = scale if feature_scale is None else float(feature_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_lin = q if q_lin is None or not linear else q_lin.contiguous()
    k_lin = k if k_lin is None or not linear else k_lin.contiguous()
    if linear and (k_lin.shape != q_lin.shape or q_lin.shape[:3] != q.shape[:3] or q_lin.shape[-1] != proj.shape[0]):
        raise ValueError(f"q_lin {tuple(q_lin.shape)} / k_lin {tuple(k_lin.shape)} must be [B, T, H] = "
                         f"{tuple(q.shape[:3])} by proj's {proj.shape[0]} rows")
    if q_lin is not q:  # of another width: the linear part's chunk kernel must take them too
        ok, why = triton_supported(q_lin, k_lin, v, proj)
        if not ok:
            raise ValueError(f"fused window attention cannot run its linear part: {why}")
    lin_state = None
    if T > window and linear:
        # one normalised call that also returns its denominator D; N = o * (D + eps) recovers the numerator. A
        # per-token decay: row r is query r + window, whose step decays what left the window before it
        lin_decay = log_decay[:, window:].contiguous() if log_decay.dim() == 3 else log_decay
        lin_o, lin_den, lin_state = fused_dijiang_with_denominator(
            q_lin[:, window:], k_lin[:, : T - window], v[:, : T - window], proj, log_weight, lin_decay,
            scale=feature_scale, output_final_state=output_final_state, eps=LIN_EPS)
        lin_num = lin_o * (lin_den.view(B, H, T - window).transpose(1, 2) + LIN_EPS).unsqueeze(-1)
    else:
        lin_num = v.new_zeros(B, 0, H, v.shape[-1], dtype=torch.float32)
        lin_den = v.new_zeros(B * H, 0, dtype=torch.float32)
    o = _WindowBand.apply(q, k, v, lin_num, lin_den, lin_weight.float().contiguous(), window, scale, float(eps),
                          sinks)
    if not output_final_state:
        return o, None
    kept = k_lin[:, T - min(T, window):]
    if linear:
        k_feat = dijiang_feature_map(kept, proj, log_weight, feature_scale).to(k.dtype)
    else:  # no linear part, no linear state: S and kf of width 0 (what window_attention gives for features of width 0)
        k_feat = k.new_zeros(*kept.shape[:-1], 0)
    return o, _final_state(k, v, k_feat, lin_state, window, k_feat.shape[-1], sinks)
