"""Fused DiJiang attention on the GPU (Triton): the softmax feature map is computed inside the
attention kernels, so phi(q), phi(k) never reach device memory, forward and backward.

    phi(x) = softmax_m(sqrt(scale) * x @ P + log_weight[h])          x: [d], P: [d, m]
    o_t    = sum_{j<=t} exp((t - j) log_decay_h) (phi(q_t) . phi(k_j)) v_j  (+ initial state term)
    normalize=True: o_t / (same sum with v = 1 + eps)

Equals ``dijiang.ops.linear_attention(phi(q), phi(k), v, log_decay, normalize=...)`` (same state
layout: ``[B, H, m, dv (+1 normaliser column)]`` float32).

Algorithm (chunk size C = 64, chunks grouped in segments of L chunks):

forward
  F1  one program per (segment, b*h): walks its L chunks, computes phi(k) and the segment-local
      state entering each chunk (stored, float32) and the segment's own state sum.
  F2  one small sequential scan per (b*h) over segments: segment-entering states (and the final state).
  F3  one program per (chunk, b*h): phi(q), phi(k), the intra-chunk decayed quadratic part and the
      inter-chunk part from the (segment-local + decayed segment-entering) state; writes o
      (and the normaliser per token when normalize=True).
backward (same structure, time reversed)
  B1  per segment: local backward states dL/dS (from the segment's own later chunks), per chunk.
  B2  reverse scan over segments (starts from dL/d final_state, ends with dL/d initial_state).
  B3  per chunk: recomputes phi(q), phi(k), all of dq, dk, dv, the softmax backward, per-chunk
      partial sums for d log_weight and d log_decay; the last program of each head to finish (an
      atomic counter) sums that head's partials in a fixed order.

Inline mode (no state in or out, up to INLINE_MAX_TILES chunk tiles): about sqrt(NC) chunks per
segment, and F3/B3 carry the segment states over the earlier (later) segments themselves, so F2
and B2 are not launched. A short call is bound by host time (Python, launches), not GPU time:
forward + backward is then four launches instead of seven.

Decay gradient (no cancellation): with S_c = g^{n_c} S_{c-1} + sum_j g^{n_c-1-j} K_j^T v_j and
o_t = intra(g) + g^{i+1} Q_t S_{c-1}, the chain rule through the chunk recurrence gives per chunk
   sum_ij (i-j) A_ij M_ij                         (intra pairs; A = QK^T * decay mask, M = dO V^T)
 + sum_i (i+1) Q_i . dQ_inter_i                   (queries reading the entering state)
 + n_c g^{n_c} <dL/dS_c, S_{c-1}> + sum_j (n_c-1-j) K_j . dK_inter_j   (the state update)
where every quantity is already in the backward kernel. Summed over chunks and batch in B3.

Per-token decay (``log_decay`` [B, T, H], a data-dependent gate; constexpr TOK): every factor g^n above becomes
exp of a sum of the steps it spans, read from one float32 buffer made in torch (``_token_decays``: in-chunk
cumulative sums, and per chunk and segment the sums over whole chunks), so no factor is a difference of two long
sums. d log_decay_s sums what every pair (query i >= s, key j < s; the final state a query after T - 1)
contributes, with no long cancelling sum: B3 adds, for the steps s of its chunk, the pairs inside the chunk
(row sums of A * M less column sums, summed over rows i >= s), the queries reading the entering state
(Q_i . dQ_inter_i over i >= s), the keys read after the chunk (K_j . dK_inter_j over j < s) and the pairs that
span the chunk (g^{n_c} <dL/dS_c, S_{c-1}>). (The shorter form, the reverse cumulative sum over t of
phi(q_t) . dphi(q_t) - phi(k_t) . dphi(k_t), cancels across the whole sequence: in bf16 it was 12 % off the
float32 op at T = 2048 on fast-decaying heads.)

Numbers: bf16 (or fp16/fp32) inputs, fp32 accumulation; the feature-map product x @ P is a tf32
dot with P kept in float32; states are float32 in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dijiang import settings

try:  # triton is optional (CPU machines, CI)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["fused_dijiang_attention", "torch_dijiang_attention", "dijiang_feature_map", "triton_supported"]

SUPPORTED_DIMS = (16, 32, 64, 128)  # what the kernels compile for (and run under the Triton interpreter)
# What runs on CUDA: the sizes the GPU tests cover. dv = 16 gave wrong outputs past the first chunk and an illegal
# memory access at T = 4096 on the H100 (bf16, Triton 3.6) while the interpreter gets it right; 16/32 stay off
# until a GPU test covers them.
GPU_DIMS = (64, 128)


# ---------------------------------------------------------------------------------------------
# Torch reference / fallback
# ---------------------------------------------------------------------------------------------


def dijiang_feature_map(x: Tensor, proj: Tensor, log_weight: Tensor | None, scale: float) -> Tensor:
    """softmax_m(sqrt(scale) x @ P + log_weight), fp32 math, output fp32. x: [B, T, H, d]."""
    z = (x.float() * math.sqrt(scale)) @ proj.float()
    if log_weight is not None:
        z = z + log_weight.float()
    return torch.softmax(z, dim=-1)


def torch_dijiang_attention(q, k, v, proj, log_weight, log_decay, *, scale=None, normalize=False,
                            initial_state=None, output_final_state=False, chunk_size=64,
                            attention_mask=None, eps=1e-6):
    """Separate feature map + ``dijiang.ops.linear_attention`` (chunk form): the fallback path."""
    from . import linear_attention

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    fq = dijiang_feature_map(q, proj, log_weight, scale).to(q.dtype)
    fk = dijiang_feature_map(k, proj, log_weight, scale).to(k.dtype)
    return linear_attention(fq, fk, v, log_decay, mode="chunk", chunk_size=chunk_size,
                            initial_state=initial_state, output_final_state=output_final_state,
                            normalize=normalize, attention_mask=attention_mask, eps=eps)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _phi(x, P, w, s, valid):
        """Softmax features of a [C, D] tile; rows outside the sequence are zero."""
        z = tl.dot(x.to(tl.float32), P) * s + w[None, :]
        z = z - tl.max(z, axis=1)[:, None]
        e = tl.exp(z)
        f = e / tl.sum(e, axis=1)[:, None]
        return tl.where(valid[:, None], f, 0.0)

    @triton.jit
    def _tok_rows(tok_ptr, bh, c, NC, C: tl.constexpr, ar_c):
        """Per-token decay (TOK): chunk c's in-chunk cumulative log decays, steps 0 .. i for row i (rows past
        T repeat the last: their steps are 0)."""
        return tl.load(tok_ptr + (bh.to(tl.int64) * NC + c) * C + ar_c)

    @triton.jit
    def _tok_chunk(tok_ptr, part: tl.constexpr, bh, c, NC, C: tl.constexpr):
        """TOK: chunk c's log decay over all its steps (part 1), over the chunks before it in its segment (2),
        over those after it (3). The buffer (``_token_decays``): rows, then parts 1-3, then segment totals."""
        n_bh = tl.num_programs(1).to(tl.int64)
        return tl.load(tok_ptr + n_bh * NC * C + (part - 1) * n_bh * NC + bh.to(tl.int64) * NC + c)

    @triton.jit
    def _tok_segments(tok_ptr, NC, C: tl.constexpr):
        """TOK: where the segments' total log decays ([B*H, NSEG]) start in the buffer."""
        n_bh = tl.num_programs(1).to(tl.int64)
        return tok_ptr + n_bh * NC * C + 3 * n_bh * NC

    @triton.jit
    def _carried_state(seg_ptr, row0, first, count, step, lam, SEGLEN, ar_m, ar_v,
                       M: tl.constexpr, DV: tl.constexpr, NORM: tl.constexpr, st_ptr, TOK: tl.constexpr):
        """What the scan kernel would leave in seg[first - step]: the segment-local states seg[first],
        seg[first + step], ... (``count`` of them, full segments) carried across one another with the decay,
        the last one undecayed (TOK: each segment's own total decay, st_ptr[row0 + segment]). INLINE mode:
        F3/B3 call it instead of a scan launch."""
        E = M * DV + M * NORM
        dec = tl.exp((SEGLEN * 1.0) * lam)
        S = tl.zeros([M, DV], dtype=tl.float32)
        z = tl.zeros([M], dtype=tl.float32)
        for i in range(0, count):
            sb = seg_ptr + (row0 + first + step * i) * E
            if TOK:
                dec = tl.exp(tl.load(st_ptr + row0 + first + step * i))
            S = S * dec + tl.load(sb + ar_m[:, None] * DV + ar_v[None, :])
            if NORM:
                z = z * dec + tl.load(sb + M * DV + ar_m)
        return S, z

    @triton.jit
    def _entering_state(seg_ptr, bh, NSEG, sg, lam, SEGLEN, ar_m, ar_v, M: tl.constexpr, DV: tl.constexpr,
                        NORM: tl.constexpr, INLINE: tl.constexpr, REVERSE: tl.constexpr, st_ptr, TOK: tl.constexpr):
        """The state entering segment sg (REVERSE: dL/dS at its end) and its normaliser part: read from the
        scanned seg buffer, or (INLINE) carried here over the segment-local states of the segments before it
        (REVERSE: after it)."""
        row0 = bh.to(tl.int64) * NSEG
        if INLINE:
            if REVERSE:
                S, z = _carried_state(seg_ptr, row0, NSEG - 1, NSEG - 1 - sg, -1, lam, SEGLEN, ar_m, ar_v, M, DV,
                                      NORM, st_ptr, TOK)
            else:
                S, z = _carried_state(seg_ptr, row0, 0, sg, 1, lam, SEGLEN, ar_m, ar_v, M, DV, NORM, st_ptr, TOK)
        else:
            E = M * DV + M * NORM
            sb = seg_ptr + (row0 + sg) * E
            S = tl.load(sb + ar_m[:, None] * DV + ar_v[None, :])
            if NORM:
                z = tl.load(sb + M * DV + ar_m)
            else:
                z = tl.zeros([M], dtype=tl.float32)
        return S, z

    @triton.jit
    def _segment_region(chunk_ptr, NC, E: tl.constexpr):
        """One buffer per direction holds the per-chunk states [B*H, NC, E] and, right after them, the segment
        states [B*H, NSEG, E] (the backward's also B3's partial sums): one allocation instead of several."""
        return chunk_ptr + tl.num_programs(1).to(tl.int64) * NC * E

    @triton.jit
    def _f1_segment_states(
        k_ptr, v_ptr, p_ptr, w_ptr, ld_ptr, tok_ptr, hloc_ptr,
        T, H, NC, NSEG, s,
        C: tl.constexpr, D: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
        NORM: tl.constexpr, TOK: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        DT = v_ptr.dtype.element_ty
        E = M * DV + M * NORM
        lam = tl.load(ld_ptr + h).to(tl.float32)
        ar_c = tl.arange(0, C)
        ar_d = tl.arange(0, D)
        ar_m = tl.arange(0, M)
        ar_v = tl.arange(0, DV)
        P = tl.load(p_ptr + ar_d[:, None] * M + ar_m[None, :])
        w = tl.load(w_ptr + h * M + ar_m)
        kb = k_ptr + (b.to(tl.int64) * T * H + h) * D
        vb = v_ptr + (b.to(tl.int64) * T * H + h) * DV
        S = tl.zeros([M, DV], dtype=tl.float32)
        z = tl.zeros([M], dtype=tl.float32)
        for ci in range(0, L):
            c = pid_s * L + ci
            if c < NC:
                t0 = c * C
                rows = t0 + ar_c
                valid = rows < T
                n = tl.minimum(T - t0, C)
                base = (bh.to(tl.int64) * NC + c)
                tl.store(hloc_ptr + base * E + ar_m[:, None] * DV + ar_v[None, :], S)
                if NORM:
                    tl.store(hloc_ptr + base * E + M * DV + ar_m, z)
                kx = tl.load(kb + rows[:, None] * H * D + ar_d[None, :], mask=valid[:, None], other=0.0)
                K = _phi(kx, P, w, s, valid)
                vx = tl.load(vb + rows[:, None] * H * DV + ar_v[None, :], mask=valid[:, None], other=0.0)
                if TOK:  # steps after each key to the chunk's end; the chunk's steps
                    total = _tok_chunk(tok_ptr, 1, bh, c, NC, C)
                    wk = tl.where(valid, tl.exp(total - _tok_rows(tok_ptr, bh, c, NC, C, ar_c)), 0.0)
                    dec = tl.exp(total)
                else:
                    wk = tl.where(valid, tl.exp((n - 1 - ar_c).to(tl.float32) * lam), 0.0)
                    dec = tl.exp((n * 1.0) * lam)
                Kw = K * wk[:, None]
                # tf32 with the weighted features unrounded: their bf16 rounding was the largest single source of
                # the d log_decay error (scripts/kernel_emulation.py; docs/kernel_notes.md, accuracy of d log_decay)
                S = S * dec + tl.dot(tl.trans(Kw), vx.to(tl.float32), input_precision="tf32")
                if NORM:
                    z = z * dec + tl.sum(Kw, axis=0)
        sb = _segment_region(hloc_ptr, NC, E) + (bh.to(tl.int64) * NSEG + pid_s) * E
        tl.store(sb + ar_m[:, None] * DV + ar_v[None, :], S)
        if NORM:
            tl.store(sb + M * DV + ar_m, z)

    @triton.jit
    def _scan_segments(
        seg_ptr, init_ptr, final_ptr, ld_ptr, st_ptr, T, H, NSEG, E, SEGLEN,
        BLK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
        TOK: tl.constexpr,
    ):
        """seg[s] <- state entering segment s (REVERSE: dL/dS at the end of segment s). TOK: st_ptr holds each
        segment's total log decay [B*H, NSEG]."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % H
        offs = pid * BLK + tl.arange(0, BLK)
        msk = offs < E
        lam = tl.load(ld_ptr + h).to(tl.float32)
        if HAS_INIT:
            S = tl.load(init_ptr + bh.to(tl.int64) * E + offs, mask=msk, other=0.0)
        else:
            S = tl.zeros([BLK], dtype=tl.float32)
        # the loads do not depend on the carried state: fetch one segment ahead to hide their latency
        if REVERSE:
            first = NSEG - 1
        else:
            first = 0
        u = tl.load(seg_ptr + (bh.to(tl.int64) * NSEG + first) * E + offs, mask=msk, other=0.0)
        for i in range(0, NSEG):
            if REVERSE:
                si = NSEG - 1 - i
                nxt = si - 1
            else:
                si = i
                nxt = si + 1
            # all E entries while a next segment exists, none after the last. One block comparison, not
            # msk & (a scalar predicate): Triton's interpreter holds that and as int32, which 3.9 refuses as a mask
            next_limit = tl.where((i + 1) < NSEG, E, 0)
            u_next = tl.load(seg_ptr + (bh.to(tl.int64) * NSEG + nxt) * E + offs, mask=offs < next_limit, other=0.0)
            tl.store(seg_ptr + (bh.to(tl.int64) * NSEG + si) * E + offs, S, mask=msk)
            if TOK:
                S = S * tl.exp(tl.load(st_ptr + bh.to(tl.int64) * NSEG + si)) + u
            else:
                n = tl.minimum(SEGLEN, T - si * SEGLEN)
                S = S * tl.exp((n * 1.0) * lam) + u
            u = u_next
        if STORE_FINAL:
            tl.store(final_ptr + bh.to(tl.int64) * E + offs, S, mask=msk)

    @triton.jit
    def _f3_output(
        q_ptr, k_ptr, v_ptr, p_ptr, w_ptr, ld_ptr, tok_ptr, hloc_ptr, o_ptr, den_ptr,
        T, H, NC, NSEG, s, eps,
        C: tl.constexpr, D: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
        NORM: tl.constexpr, INLINE: tl.constexpr, TOK: tl.constexpr,
    ):
        c = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        DT = v_ptr.dtype.element_ty
        E = M * DV + M * NORM
        sg = c // L
        lam = tl.load(ld_ptr + h).to(tl.float32)
        ar_c = tl.arange(0, C)
        ar_d = tl.arange(0, D)
        ar_m = tl.arange(0, M)
        ar_v = tl.arange(0, DV)
        t0 = c * C
        rows = t0 + ar_c
        valid = rows < T
        S_in, z_in = _entering_state(_segment_region(hloc_ptr, NC, E), bh, NSEG, sg, lam, L * C, ar_m, ar_v, M, DV,
                                     NORM, INLINE, False, _tok_segments(tok_ptr, NC, C), TOK)
        P = tl.load(p_ptr + ar_d[:, None] * M + ar_m[None, :])
        w = tl.load(w_ptr + h * M + ar_m)
        tok = (b.to(tl.int64) * T * H + h)
        qx = tl.load(q_ptr + tok * D + rows[:, None] * H * D + ar_d[None, :], mask=valid[:, None], other=0.0)
        kx = tl.load(k_ptr + tok * D + rows[:, None] * H * D + ar_d[None, :], mask=valid[:, None], other=0.0)
        vx = tl.load(v_ptr + tok * DV + rows[:, None] * H * DV + ar_v[None, :], mask=valid[:, None], other=0.0)
        Q = _phi(qx, P, w, s, valid)
        K = _phi(kx, P, w, s, valid)
        ii = ar_c[:, None]
        jj = ar_c[None, :]
        if TOK:
            cum = _tok_rows(tok_ptr, bh, c, NC, C, ar_c)
            Dm = tl.exp(tl.where(ii >= jj, cum[:, None] - cum[None, :], float("-inf")))
            g_in = tl.exp(cum)
            fs = tl.exp(_tok_chunk(tok_ptr, 2, bh, c, NC, C))
        else:
            Dm = tl.where(ii >= jj, tl.exp((ii - jj).to(tl.float32) * lam), 0.0)
            g_in = tl.exp((ar_c + 1).to(tl.float32) * lam)
            fs = tl.exp((t0 - sg * L * C).to(tl.float32) * lam)
        A = tl.dot(Q.to(DT), tl.trans(K.to(DT))) * Dm
        o = tl.dot(A.to(DT), vx)
        base = bh.to(tl.int64) * NC + c
        hs = tl.load(hloc_ptr + base * E + ar_m[:, None] * DV + ar_v[None, :]) + fs * S_in
        Qg = Q * g_in[:, None]
        o += tl.dot(Qg.to(DT), hs.to(DT))
        if NORM:
            zs = tl.load(hloc_ptr + base * E + M * DV + ar_m) + fs * z_in
            den = tl.sum(A, axis=1) + tl.sum(Qg * zs[None, :], axis=1)
            o = o / (den + eps)[:, None]
            tl.store(den_ptr + bh.to(tl.int64) * T + rows, den, mask=valid)
        tl.store(o_ptr + tok * DV + rows[:, None] * H * DV + ar_v[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=valid[:, None])

    @triton.jit
    def _b1_segment_dstates(
        q_ptr, do_ptr, o_ptr, den_ptr, dden_ptr, dden_in_ptr, p_ptr, w_ptr, ld_ptr, tok_ptr, dloc_ptr,
        T, H, NC, NSEG, s, eps,
        C: tl.constexpr, D: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
        NORM: tl.constexpr, DDEN_IN: tl.constexpr, TOK: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        DT = do_ptr.dtype.element_ty
        E = M * DV + M * NORM
        lam = tl.load(ld_ptr + h).to(tl.float32)
        ar_c = tl.arange(0, C)
        ar_d = tl.arange(0, D)
        ar_m = tl.arange(0, M)
        ar_v = tl.arange(0, DV)
        P = tl.load(p_ptr + ar_d[:, None] * M + ar_m[None, :])
        w = tl.load(w_ptr + h * M + ar_m)
        tok = (b.to(tl.int64) * T * H + h)
        G = tl.zeros([M, DV], dtype=tl.float32)
        g = tl.zeros([M], dtype=tl.float32)
        for r in range(0, L):
            c = pid_s * L + L - 1 - r
            if c < NC:
                t0 = c * C
                rows = t0 + ar_c
                valid = rows < T
                n = tl.minimum(T - t0, C)
                base = bh.to(tl.int64) * NC + c
                tl.store(dloc_ptr + base * E + ar_m[:, None] * DV + ar_v[None, :], G)
                if NORM:
                    tl.store(dloc_ptr + base * E + M * DV + ar_m, g)
                qx = tl.load(q_ptr + tok * D + rows[:, None] * H * D + ar_d[None, :], mask=valid[:, None], other=0.0)
                Q = _phi(qx, P, w, s, valid)
                dox = tl.load(do_ptr + tok * DV + rows[:, None] * H * DV + ar_v[None, :], mask=valid[:, None],
                              other=0.0).to(tl.float32)
                if TOK:
                    g_in = tl.exp(_tok_rows(tok_ptr, bh, c, NC, C, ar_c))
                    dec = tl.exp(_tok_chunk(tok_ptr, 1, bh, c, NC, C))
                else:
                    g_in = tl.exp((ar_c + 1).to(tl.float32) * lam)
                    dec = tl.exp((n * 1.0) * lam)
                Qg = Q * g_in[:, None]
                if NORM:
                    ox = tl.load(o_ptr + tok * DV + rows[:, None] * H * DV + ar_v[None, :], mask=valid[:, None],
                                 other=0.0).to(tl.float32)
                    dd = tl.load(den_ptr + bh.to(tl.int64) * T + rows, mask=valid, other=1.0) + eps
                    dden = -tl.sum(dox * ox, axis=1) / dd
                    if DDEN_IN:  # a gradient for the denominator itself (an output of the op)
                        dden += tl.load(dden_in_ptr + bh.to(tl.int64) * T + rows, mask=valid, other=0.0)
                    tl.store(dden_ptr + bh.to(tl.int64) * T + rows, dden, mask=valid)
                    dn = dox / dd[:, None]
                    g = g * dec + tl.sum(Qg * dden[:, None], axis=0)
                else:
                    dn = dox
                G = G * dec + tl.dot(tl.trans(Qg.to(DT)), dn.to(DT))
        sb = _segment_region(dloc_ptr, NC, E) + (bh.to(tl.int64) * NSEG + pid_s) * E
        tl.store(sb + ar_m[:, None] * DV + ar_v[None, :], G)
        if NORM:
            tl.store(sb + M * DV + ar_m, g)

    @triton.jit
    def _b3_grads(
        q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, dden_ptr, p_ptr, w_ptr, ld_ptr, tok_ptr,
        hloc_ptr, dloc_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, dlam_ptr, count_ptr, dtok_ptr,
        B, T, H, NC, NSEG, s, eps,
        C: tl.constexpr, D: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
        NORM: tl.constexpr, INLINE: tl.constexpr, REDUCE: tl.constexpr, TOK: tl.constexpr,
    ):
        c = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        DT = v_ptr.dtype.element_ty
        E = M * DV + M * NORM
        sg = c // L
        lam = tl.load(ld_ptr + h).to(tl.float32)
        ar_c = tl.arange(0, C)
        ar_d = tl.arange(0, D)
        ar_m = tl.arange(0, M)
        ar_v = tl.arange(0, DV)
        t0 = c * C
        rows = t0 + ar_c
        valid = rows < T
        n = tl.minimum(T - t0, C)
        P = tl.load(p_ptr + ar_d[:, None] * M + ar_m[None, :])
        w = tl.load(w_ptr + h * M + ar_m)
        tok = (b.to(tl.int64) * T * H + h)
        qoff = tok * D + rows[:, None] * H * D + ar_d[None, :]
        voff = tok * DV + rows[:, None] * H * DV + ar_v[None, :]
        qx = tl.load(q_ptr + qoff, mask=valid[:, None], other=0.0)
        kx = tl.load(k_ptr + qoff, mask=valid[:, None], other=0.0)
        vx = tl.load(v_ptr + voff, mask=valid[:, None], other=0.0)
        dox = tl.load(do_ptr + voff, mask=valid[:, None], other=0.0)
        Q = _phi(qx, P, w, s, valid)
        K = _phi(kx, P, w, s, valid)
        Qb = Q.to(DT)
        Kb = K.to(DT)
        if NORM:
            dd = tl.load(den_ptr + bh.to(tl.int64) * T + rows, mask=valid, other=1.0) + eps
            dden = tl.load(dden_ptr + bh.to(tl.int64) * T + rows, mask=valid, other=0.0)
            dn = (dox.to(tl.float32) / dd[:, None]).to(DT)
        else:
            dn = dox
        ii = ar_c[:, None]
        jj = ar_c[None, :]
        dist = (ii - jj).to(tl.float32)
        if TOK:
            cum = _tok_rows(tok_ptr, bh, c, NC, C, ar_c)
            Dm = tl.exp(tl.where(ii >= jj, cum[:, None] - cum[None, :], float("-inf")))
        else:
            Dm = tl.where(ii >= jj, tl.exp(dist * lam), 0.0)
        A = tl.dot(Qb, tl.trans(Kb)) * Dm
        Mx = tl.dot(dn, tl.trans(vx))
        if NORM:
            Mx += dden[:, None]
        Md = Mx * Dm
        if not TOK:
            term = tl.sum(tl.sum(dist * A * Mx, axis=1), axis=0)
        # states: forward entering chunk c, backward dL/dS after chunk c
        base = bh.to(tl.int64) * NC + c
        segb_ptr = _segment_region(dloc_ptr, NC, E)
        st_ptr = _tok_segments(tok_ptr, NC, C)
        S_in, z_in = _entering_state(_segment_region(hloc_ptr, NC, E), bh, NSEG, sg, lam, L * C, ar_m, ar_v, M, DV,
                                     NORM, INLINE, False, st_ptr, TOK)
        G_in, g_in_b = _entering_state(segb_ptr, bh, NSEG, sg, lam, L * C, ar_m, ar_v, M, DV, NORM, INLINE, True,
                                       st_ptr, TOK)
        if TOK:  # what the steps before this chunk in its segment, and after it, leave
            fs = tl.exp(_tok_chunk(tok_ptr, 2, bh, c, NC, C))
            fb = tl.exp(_tok_chunk(tok_ptr, 3, bh, c, NC, C))
        else:
            fs = tl.exp((t0 - sg * L * C).to(tl.float32) * lam)
            seg_end = tl.minimum((sg + 1) * L * C, T)
            fb = tl.exp((seg_end - (t0 + n)).to(tl.float32) * lam)
        moff = ar_m[:, None] * DV + ar_v[None, :]
        hs = tl.load(hloc_ptr + base * E + moff) + fs * S_in
        dhs = tl.load(dloc_ptr + base * E + moff) + fb * G_in
        if TOK:
            total = _tok_chunk(tok_ptr, 1, bh, c, NC, C)
            g_in = tl.exp(cum)
            g_out = tl.where(valid, tl.exp(total - cum), 0.0)
            dec = tl.exp(total)
        else:
            g_in = tl.exp((ar_c + 1).to(tl.float32) * lam)
            g_out = tl.where(valid, tl.exp((n - 1 - ar_c).to(tl.float32) * lam), 0.0)
            dec = tl.exp((n * 1.0) * lam)
        dQi = tl.dot(dn, tl.trans(hs.to(DT)))
        dKi = tl.dot(vx, tl.trans(dhs.to(DT)))
        st = tl.sum(tl.sum(dhs * hs, axis=1), axis=0)
        if NORM:
            zs = tl.load(hloc_ptr + base * E + M * DV + ar_m) + fs * z_in
            dzs = tl.load(dloc_ptr + base * E + M * DV + ar_m) + fb * g_in_b
            dQi += dden[:, None] * zs[None, :]
            dKi += dzs[None, :]
            st += tl.sum(dzs * zs, axis=0)
        dQi = dQi * g_in[:, None]
        dKi = dKi * g_out[:, None]
        if TOK:
            # dL/d log_decay_s sums the pairs (query i >= s, key j < s) it decays (the final state a query after
            # T - 1), in four parts: pairs inside this chunk (row sums of A * Mx less column sums, reverse
            # summed), queries here reading keys before the chunk (Q . dQi, reverse summed), keys here read after
            # it (K . dKi, summed before s), and pairs that span the whole chunk (dec * <dL/dS_c, S_{c-1}>). Each
            # part is exact up to float32 sums inside one chunk, so no long cancelling sum is left
            pair = A * Mx
            x = tl.sum(pair, axis=1) - tl.sum(pair, axis=0) + tl.sum(Q * dQi, axis=1)
            y = tl.sum(K * dKi, axis=1)
            dtok = tl.sum(tl.where(ii >= jj, x[:, None], 0.0), axis=0) + dec * st
            dtok += tl.sum(tl.where(ii < jj, y[:, None], 0.0), axis=0)
            tl.store(dtok_ptr + bh.to(tl.int64) * T + rows, dtok, mask=valid)
        else:
            term += tl.sum((ar_c + 1).to(tl.float32) * tl.sum(Q * dQi, axis=1), axis=0)
            term += (n * 1.0) * dec * st
            term += tl.sum((n - 1 - ar_c).to(tl.float32) * tl.sum(K * dKi, axis=1), axis=0)
        Mdb = Md.to(DT)
        dQ = tl.dot(Mdb, Kb) + dQi
        dK = tl.dot(tl.trans(Mdb), Qb) + dKi
        dV = tl.dot(tl.trans(A.to(DT)), dn) + g_out[:, None] * tl.dot(Kb, dhs.to(DT))
        # softmax backward (invalid rows have Q = K = 0, so their gradients vanish)
        dXq = Q * (dQ - tl.sum(Q * dQ, axis=1)[:, None])
        dXk = K * (dK - tl.sum(K * dK, axis=1)[:, None])
        Pt = tl.trans(P)
        dqx = tl.dot(dXq, Pt) * s
        dkx = tl.dot(dXk, Pt) * s
        tl.store(dq_ptr + qoff, dqx.to(dq_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(dk_ptr + qoff, dkx.to(dk_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(dv_ptr + voff, dV.to(dv_ptr.dtype.element_ty), mask=valid[:, None])
        if REDUCE:
            part_ptr = segb_ptr + tl.num_programs(1).to(tl.int64) * NSEG * E  # after the segment states
            # per-chunk partial sums: d log_weight [B, H, NC, M], then d log_decay [B, H, NC] after all of them
            tl.store(part_ptr + base * M + ar_m, tl.sum(dXq + dXk, axis=0))
            n_w = tl.num_programs(1).to(tl.int64) * NC * M
            if not TOK:  # a per-token decay's gradient is dtok, whole
                tl.store(part_ptr + n_w + base, term)
            # the last of head h's B * NC programs to get here sums their partials (no separate launch): the
            # barrier puts every thread's stores before the counter's release, the acquire before the loads
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + h, 1, sem="acq_rel", scope="gpu")
            if arrived == B * NC - 1:
                _reduce_head(part_ptr, dw_ptr, dlam_ptr, h, B, H, NC, M, 32)
                tl.atomic_xchg(count_ptr + h, 0, sem="relaxed", scope="gpu")  # ready for the next call

    @triton.jit
    def _reduce_head(part_ptr, dw_ptr, dlam_ptr, h, B, H, NC, M: tl.constexpr, BLK: tl.constexpr):
        """dw[h, :] = sum over b, c of part_w[b, h, c, :]; dlam[h] = sum of part_lam[b, h, c] (B3's partials), in a
        fixed order, so deterministic."""
        ar_m = tl.arange(0, M)
        ar_r = tl.arange(0, BLK)
        n_w = (B * H).to(tl.int64) * NC * M
        acc = tl.zeros([BLK, M], dtype=tl.float32)
        acc_l = tl.zeros([BLK], dtype=tl.float32)
        for b in range(0, B):
            row0 = (b * H + h).to(tl.int64) * NC
            for r0 in range(0, NC, BLK):
                rows = r0 + ar_r
                msk = rows < NC
                acc += tl.load(part_ptr + (row0 + rows)[:, None] * M + ar_m[None, :], mask=msk[:, None], other=0.0,
                               cache_modifier=".cg")
                acc_l += tl.load(part_ptr + n_w + row0 + rows, mask=msk, other=0.0, cache_modifier=".cg")
        tl.store(dw_ptr + h * M + ar_m, tl.sum(acc, axis=0))
        tl.store(dlam_ptr + h, tl.sum(acc_l, axis=0))

    @triton.jit
    def _reduce_partials(part_ptr, out_ptr, B, H, NC, M: tl.constexpr, BLK: tl.constexpr):
        """_reduce_head as a kernel of its own, one program per head, out = [dw (H x M), dlam (H)] (tests)."""
        _reduce_head(part_ptr, out_ptr, out_ptr + H * M, tl.program_id(0), B, H, NC, M, BLK)


# TRITON_INTERPRET=1 when triton defined the kernels above made them interpreted (CPU tensors, numpy): a fact
# fixed at import, so it is taken from the kernels rather than from the variable, which may have changed since
if HAS_TRITON:
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_f1_segment_states, InterpretedFunction)
else:  # pragma: no cover - depends on the machine
    INTERPRETED = False


# ---------------------------------------------------------------------------------------------
# Launch helpers and the autograd wrapper
# ---------------------------------------------------------------------------------------------


# Triton's dispatch (argument binding and specialisation) is Python work on every launch, and at short lengths
# the kernels' GPU time is smaller than that host time (docs/kernel_notes.md). After the first launch of a
# specialisation we call the compiled kernel directly. DIJIANG_TRITON_DIRECT_LAUNCH=0 turns this off.
_COMPILED: dict = {}
_RUNTIME_KNOBS = triton.knobs.runtime if HAS_TRITON else None


def _raw_stream(device: int) -> int:
    try:
        return torch._C._cuda_getCurrentRawStream(device)
    except AttributeError:  # pragma: no cover - torch builds without it
        return torch.cuda.current_stream(device).cuda_stream


def tensor_spec(*tensors: Tensor | None) -> tuple:
    """What Triton specialises a tensor argument on: dtype and 16-byte alignment (None stays None)."""
    return tuple(None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


def _arg_key(x):
    """What Triton specialises a runtime argument on: tensor dtype and 16-byte alignment; int range, == 1, % 16."""
    if isinstance(x, Tensor):
        return tensor_spec(x)
    if isinstance(x, bool):
        return bool, x
    if isinstance(x, int):
        return int, x == 1, x % 16 == 0, -(2**31) <= x < 2**31, 0 <= x < 2**32
    return type(x)


def int_spec(*ints: int) -> tuple:
    """The properties of int arguments that Triton specialises on (for a caller-built ``spec``)."""
    return tuple((x == 1, x % 16 == 0, -(2**31) <= x < 2**31) for x in ints)


def _launch_options(num_warps: int, num_stages: int | None) -> dict:
    return {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}


def launch(fn, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int | None = None, spec=None):
    """``fn[grid](*args, **constexprs, num_warps=...)`` with the compiled kernel called directly once this
    specialisation (argument properties, constexprs, launch options, device) has been compiled.

    ``spec``: a caller-built key standing for the arguments' properties (device, dtypes, alignment of the tensors
    not allocated by us, ``int_spec`` of the ints), cheaper than inspecting every argument; buffers from torch's
    CUDA allocator are 512-byte aligned, so they need no entry."""
    if INTERPRETED or not settings.triton_direct_launch():
        fn[grid](*args, **constexprs, **_launch_options(num_warps, num_stages))
        return
    # id(fn): hashing a JITFunction takes a lock and a property call on every launch
    if spec is None:
        key = (id(fn), args[0].get_device(), num_warps, num_stages, tuple(constexprs.items()),
               tuple(map(_arg_key, args)))
    else:
        key = (id(fn), spec, num_warps, num_stages, tuple(constexprs.values()))
    hit = _COMPILED.get(key)
    if hit is None:
        kernel = fn[grid](*args, **constexprs, **_launch_options(num_warps, num_stages))
        # the launcher takes every parameter in signature order, constexprs included
        tail = tuple(constexprs[name] for name in fn.arg_names[len(args):])
        _COMPILED[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata, tail, args[0].get_device())
        return
    kernel, run, function, packed, tail, device = hit
    g = (tuple(grid) + (1, 1))[:3]
    stream = _raw_stream(device)
    enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
    if getattr(enter, "calls", True) or getattr(leave, "calls", True):  # a profiler listens: hand it what Triton does
        meta = kernel.launch_metadata(g, stream, *args, *tail)
    else:
        enter = leave = meta = None
    run(g[0], g[1], g[2], stream, function, packed, meta, enter, leave, *args, *tail)


SEGMENT_CHUNKS_OVERRIDE: int | None = None  # tests: force the segment length (chunks)
# Up to this many (chunk, b*h) tiles the op is host-bound on the H100 (its GPU work is shorter than the Python and
# launch cost of its kernels), so F3/B3 carry the segment states themselves and the two scan launches go.
INLINE_MAX_TILES = 2048


def _segment_plan(num_chunks: int, bh: int, plain: bool) -> tuple[int, bool]:
    """(chunks per segment, inline). Default: enough segments to fill the GPU, at most 16 sequential steps each,
    and a scan kernel between F1 and F3. Inline (short sequences without state in or out): about sqrt(NC) chunks
    per segment, so F1's sequential walk and F3/B3's carry over earlier segments are both short.
    DIJIANG_INLINE_CARRY (benchmarks, tests) forces the in-kernel carry on (where allowed) or off."""
    inline = plain and num_chunks * bh <= INLINE_MAX_TILES and num_chunks <= 256
    inline_override = settings.inline_carry()
    if inline_override is not None:
        inline = plain and inline_override
    if SEGMENT_CHUNKS_OVERRIDE is not None:
        return max(1, int(SEGMENT_CHUNKS_OVERRIDE)), inline
    if inline:
        return max(1, math.isqrt(num_chunks - 1) + 1), True
    return max(1, min(16, (num_chunks * bh) // 264)), False


TUNE: dict = {"warps": None, "stages": None}  # benchmarks: override the per-chunk kernels' launch config


def _warps(m: int, dv: int, d: int) -> int:
    if TUNE.get("warps"):
        return int(TUNE["warps"])
    return 8 if max(m, dv, d) >= 128 else 4


def _stages() -> dict:
    return {"num_stages": int(TUNE["stages"])} if TUNE.get("stages") else {}


class _Cfg:
    __slots__ = ("B", "T", "H", "D", "M", "DV", "C", "NC", "L", "NSEG", "inline", "E", "s", "eps", "norm", "warps",
                 "ints", "consts", "consts_out", "consts_grads", "consts_grads_no_reduce")

    def __init__(self, q, v, proj, scale, eps, normalize, chunk_size, plain=False):
        """plain: no initial state in and no final state out (the in-kernel carry is allowed)."""
        self.B, self.T, self.H, self.D = q.shape
        self.M = proj.shape[1]
        self.DV = v.shape[-1]
        self.C = chunk_size
        self.NC = -(-self.T // self.C)
        self.L, self.inline = _segment_plan(self.NC, self.B * self.H, plain)
        self.NSEG = -(-self.NC // self.L)
        self.norm = int(normalize)
        self.E = self.M * self.DV + self.M * self.norm
        self.s = math.sqrt(scale)
        self.eps = float(eps)
        self.warps = _warps(self.M, self.DV, self.D)
        self.ints = int_spec(self.B, self.T, self.H, self.NC, self.NSEG, self.E, self.L * self.C)
        # the kernels' constexprs, built once (TOK: the per-token decay's, see _token_decays)
        self.consts = dict(C=self.C, D=self.D, M=self.M, DV=self.DV, L=self.L, NORM=self.norm, TOK=False)
        self.consts_out = dict(self.consts, INLINE=self.inline)
        self.consts_grads = dict(self.consts_out, REDUCE=True)
        self.consts_grads_no_reduce = dict(self.consts_out, REDUCE=False)

    def with_tok(self, consts: dict, tok: bool) -> dict:
        return dict(consts, TOK=True) if tok else consts


_CFGS: dict = {}


def _cfg_for(q, v, proj, scale, eps, normalize, chunk_size, plain) -> _Cfg:
    """The call's _Cfg, built once per shape and option set: building it is pure host work that a short,
    launch-bound call would otherwise repeat on every step."""
    key = (q.shape, v.shape[-1], proj.shape[1], scale, eps, normalize, chunk_size, plain, SEGMENT_CHUNKS_OVERRIDE,
           settings.inline_carry(), TUNE.get("warps"))
    cfg = _CFGS.get(key)
    if cfg is None:
        if len(_CFGS) > 4096:  # many sequence lengths (variable-length batches): start over
            _CFGS.clear()
        cfg = _CFGS[key] = _Cfg(q, v, proj, scale, eps, normalize, chunk_size, plain)
    return cfg


def _call_spec(cfg: _Cfg, out_dtype, q, k, v, P, w, ld) -> tuple:
    """``launch``'s key for the kernels of one call: every int argument derives from cfg; the tensors that do
    not come from our own allocations are listed by dtype and 16-byte alignment (one True when all aligned)."""
    ptrs = q.data_ptr() | k.data_ptr() | v.data_ptr() | P.data_ptr() | w.data_ptr() | ld.data_ptr()
    aligned = True if ptrs % 16 == 0 else tensor_spec(q, k, v, P, w, ld)
    return (q.get_device(), out_dtype, cfg.ints, q.dtype, k.dtype, v.dtype, P.dtype, w.dtype, ld.dtype, aligned)


def _flat_state(state: Tensor | None, cfg: _Cfg) -> Tensor | None:
    """[B, H, m, dv(+1)] -> [B*H, E] float32 (S row-major, then the normaliser column)."""
    if state is None:
        return None
    st = state.float().reshape(cfg.B * cfg.H, cfg.M, cfg.DV + cfg.norm)
    parts = [st[..., : cfg.DV].reshape(cfg.B * cfg.H, cfg.M * cfg.DV)]
    if cfg.norm:
        parts.append(st[..., cfg.DV])
    return torch.cat(parts, dim=1).contiguous()


def _unflat_state(flat: Tensor, cfg: _Cfg) -> Tensor:
    bh = cfg.B * cfg.H
    S = flat[:, : cfg.M * cfg.DV].reshape(bh, cfg.M, cfg.DV)
    if cfg.norm:
        S = torch.cat([S, flat[:, cfg.M * cfg.DV :, None]], dim=2)
    return S.reshape(cfg.B, cfg.H, cfg.M, cfg.DV + cfg.norm)


def _state_buffer(cfg: _Cfg, dev, extra: int = 0) -> Tensor:
    """Per-chunk states [B*H, NC, E], then segment states [B*H, NSEG, E], then ``extra`` floats: one float32
    allocation (the kernels find the segment part with _segment_region)."""
    bh = cfg.B * cfg.H
    return torch.empty(bh * (cfg.NC + cfg.NSEG) * cfg.E + extra, device=dev, dtype=torch.float32)


def _segments_of(states: Tensor, cfg: _Cfg) -> Tensor:
    """The segment-state part of a _state_buffer, [B*H, NSEG, E] (for the scan kernel)."""
    bh = cfg.B * cfg.H
    start = bh * cfg.NC * cfg.E
    return states[start : start + bh * cfg.NSEG * cfg.E].view(bh, cfg.NSEG, cfg.E)


def _token_decays(log_decay: Tensor, cfg: _Cfg) -> Tensor:
    """A per-token log decay [B, T, H] as the kernels read it (TOK), one float32 buffer: for every b*h row, the
    in-chunk cumulative log decays [B*H, NC, C] (steps 0 .. i of each chunk; 0 past T); then per chunk [B*H, NC]
    its total, the total of the chunks before it in its segment and of those after it; then per segment its total
    [B*H, NSEG]. Sums of few steps each, so no decay factor is a difference of two long sums."""
    bh, C, NC, L, NSEG = cfg.B * cfg.H, cfg.C, cfg.NC, cfg.L, cfg.NSEG
    steps = log_decay.float().permute(0, 2, 1).reshape(bh, cfg.T)
    rows = F.pad(steps, [0, NC * C - cfg.T]).view(bh, NC, C).cumsum(-1)
    chunk = F.pad(rows[..., -1], [0, NSEG * L - NC]).view(bh, NSEG, L)
    before = F.pad(chunk.cumsum(-1)[..., :-1], [1, 0])
    after = F.pad(chunk.flip(-1).cumsum(-1)[..., :-1], [1, 0]).flip(-1)
    per_chunk = [x.reshape(bh, NSEG * L)[:, :NC] for x in (chunk, before, after)]
    return torch.cat([rows.reshape(-1)] + [x.reshape(-1) for x in per_chunk] + [chunk.sum(-1).reshape(-1)])


def _segment_totals(tok: Tensor, cfg: _Cfg) -> Tensor:
    """The per-segment part of a _token_decays buffer (the scan's st_ptr)."""
    bh = cfg.B * cfg.H
    return tok[bh * cfg.NC * (cfg.C + 3):]


def _forward(q, k, v, P, w, ld, init_flat, cfg: _Cfg, want_final: bool, out_dtype: torch.dtype, spec, tok=None):
    """Launches F1, the forward scan (unless inline) and F3: (o, den or None, states, final or None).
    tok: a per-token decay's _token_decays buffer (ld is then not read)."""
    dev = q.device
    BH = cfg.B * cfg.H
    f32 = torch.float32
    is_tok = tok is not None
    tok_or_any = ld if tok is None else tok
    states = _state_buffer(cfg, dev)  # per chunk: S (m x dv), then z (m) if NORM; then per segment
    launch(_f1_segment_states, (cfg.NSEG, BH), (k, v, P, w, ld, tok_or_any, states, cfg.T, cfg.H, cfg.NC, cfg.NSEG,
                                                 cfg.s), cfg.with_tok(cfg.consts, is_tok), num_warps=4, spec=spec)
    final = torch.empty(BH, cfg.E, device=dev, dtype=f32) if want_final else None
    if not cfg.inline:
        _scan(_segments_of(states, cfg), init_flat, final, ld, cfg, False, spec, tok)
    o = torch.empty_like(v, dtype=out_dtype)
    den = torch.empty(BH, cfg.T, device=dev, dtype=f32) if cfg.norm else None
    launch(_f3_output, (cfg.NC, BH), (q, k, v, P, w, ld, tok_or_any, states, o, states if den is None else den, cfg.T,
                                      cfg.H, cfg.NC, cfg.NSEG, cfg.s, cfg.eps), cfg.with_tok(cfg.consts_out, is_tok),
           num_warps=cfg.warps, **_stages(), spec=spec)
    return o, den, states, final


def _scan(seg, init_flat, final, ld, cfg: _Cfg, reverse: bool, spec, tok=None):
    blk = 256
    launch(_scan_segments, (-(-cfg.E // blk), cfg.B * cfg.H),
           (seg, seg if init_flat is None else init_flat, seg if final is None else final, ld,
            ld if tok is None else _segment_totals(tok, cfg), cfg.T, cfg.H, cfg.NSEG, cfg.E, cfg.L * cfg.C),
           dict(BLK=blk, REVERSE=reverse, HAS_INIT=init_flat is not None, STORE_FINAL=final is not None,
                TOK=tok is not None), num_warps=4, spec=spec)


def _backward(q, k, v, P, w, ld, o, den, states, do, dfinal_flat, dden_in, cfg: _Cfg, want_dinit: bool, spec,
              want_dw=True, want_dlam=True, tok=None):
    """Launches B1, the reverse scan (unless inline) and B3: (dq, dk, dv, d log_weight [H, m], d log_decay [H],
    dinit), the last three None where not wanted. ``states``: the forward's _state_buffer. tok: a per-token
    decay's _token_decays buffer; d log_decay is then per token, [B*H, T]."""
    dev = q.device
    BH = cfg.B * cfg.H
    f32 = torch.float32
    is_tok = tok is not None
    tok_or_any = ld if tok is None else tok
    reduce = want_dw or want_dlam
    # B3's per-chunk partial sums of d log_weight [B, H, NC, M] then d log_decay [B, H, NC] ride at the end of the
    # backward state buffer; B3's last program per head sums them into dw and dlam
    dstates = _state_buffer(cfg, dev, BH * cfg.NC * (cfg.M + 1) if reduce else 0)
    dden = torch.empty(BH, cfg.T, device=dev, dtype=f32) if cfg.norm else dstates
    o_or_any = q if o is None else o  # o and den are read only when NORM
    den_or_any = dstates if den is None else den
    launch(_b1_segment_dstates, (cfg.NSEG, BH),
           (q, do, o_or_any, den_or_any, dden, dden if dden_in is None else dden_in, P, w, ld, tok_or_any, dstates,
            cfg.T, cfg.H, cfg.NC, cfg.NSEG, cfg.s, cfg.eps),
           dict(cfg.with_tok(cfg.consts, is_tok), DDEN_IN=dden_in is not None), num_warps=4, spec=spec)
    dinit = torch.empty(BH, cfg.E, device=dev, dtype=f32) if want_dinit else None
    if not cfg.inline:
        _scan(_segments_of(dstates, cfg), dfinal_flat, dinit, ld, cfg, True, spec, tok)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if reduce:  # own tensors for the two gradients: slicing one buffer cost more host time than allocating
        dw = torch.empty(cfg.H, cfg.M, device=dev, dtype=f32)
        dlam = torch.empty(cfg.H, device=dev, dtype=f32)
        counts = _head_counters(q, cfg.H)
    else:
        dw = dlam = counts = dstates
    dG = torch.empty(BH, cfg.T, device=dev, dtype=f32) if is_tok else dstates
    launch(_b3_grads, (cfg.NC, BH), (q, k, v, do, den_or_any, dden, P, w, ld, tok_or_any, states, dstates, dq, dk, dv,
                                     dw, dlam, counts, dG, cfg.B, cfg.T, cfg.H, cfg.NC, cfg.NSEG, cfg.s, cfg.eps),
           cfg.with_tok(cfg.consts_grads if reduce else cfg.consts_grads_no_reduce, is_tok), num_warps=cfg.warps,
           **_stages(), spec=spec)
    if is_tok:
        dlam = dG
    return dq, dk, dv, dw if want_dw else None, dlam if want_dlam else None, dinit


_COUNTERS: dict = {}


def _head_counters(x: Tensor, n: int) -> Tensor:
    """B3's per-head arrival counters: int32 zeros kept per device and stream (a launch on another stream could
    run at the same time), left at zero again by every B3 launch."""
    dev = x.get_device()
    key = (dev, _raw_stream(dev)) if dev >= 0 else (dev, 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=x.device)
        _COUNTERS[key] = buf
    return buf


class _FusedDiJiang(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, proj, log_weight, log_decay, initial_state, call):
        cfg, want_final, out_dtype, want_den = call  # one argument: apply's cost grows with their number
        ctx.set_materialize_grads(False)  # unused outputs get no zero gradients built
        P = proj.float().contiguous()
        w = log_weight.float().contiguous()
        ld = log_decay.float().contiguous()
        tok = _token_decays(ld, cfg) if ld.dim() == 3 else None  # a per-token decay [B, T, H]
        init_flat = _flat_state(initial_state, cfg)
        spec = _call_spec(cfg, out_dtype, q, k, v, P, w, ld)
        o, den, states, final = _forward(q, k, v, P, w, ld, init_flat, cfg, want_final, out_dtype, spec, tok)
        ctx.cfg, ctx.spec = cfg, spec
        ctx.save_for_backward(q, k, v, P, w, ld, o if cfg.norm else None, den)
        ctx.states = states  # an intermediate, never an output: no reference cycle on ctx
        ctx.tok = tok
        final_state = _unflat_state(final, cfg) if want_final else None
        # the normaliser sum per row [B*H, T] (normalize=True only), without eps
        return o, final_state, (den if want_den else None)

    @staticmethod
    def backward(ctx, do, dfinal, dden):
        if do is None and dfinal is None and dden is None:
            return (None,) * 8
        q, k, v, P, w, ld, o, den = ctx.saved_tensors
        cfg = ctx.cfg
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dfinal_flat = _flat_state(dfinal, cfg)
        dden_in = None if dden is None else dden.contiguous()
        spec = ctx.spec + tensor_spec(do, dden_in)
        need = ctx.needs_input_grad
        tok = ctx.tok
        dq, dk, dv, dw, dlam, dinit = _backward(q, k, v, P, w, ld, o, den, ctx.states, do, dfinal_flat, dden_in,
                                                cfg, need[6], spec, want_dw=need[4], want_dlam=need[5], tok=tok)
        dinit_state = _unflat_state(dinit, cfg) if dinit is not None else None
        if tok is not None and dlam is not None:  # [B*H, T] -> [B, T, H]
            dlam = dlam.view(cfg.B, cfg.H, cfg.T).permute(0, 2, 1)
        return dq, dk, dv, None, dw, dlam, dinit_state, None


_RAW_APPLY = super(torch.autograd.Function, _FusedDiJiang).apply  # torch._C._FunctionBase.apply, bound


def triton_supported(q: Tensor, k: Tensor, v: Tensor, proj: Tensor | None, chunk_size: int = 64) -> tuple[bool, str]:
    """Whether the fused Triton path takes these inputs; else (False, reason). proj None: no feature width to
    check (the window op without its linear part)."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    if not (q.is_cuda or INTERPRETED):
        return False, "inputs are not on a CUDA device"
    widths = {"d": q.shape[-1], "dv": v.shape[-1]} | ({} if proj is None else {"m": proj.shape[-1]})
    dims = GPU_DIMS if q.is_cuda else SUPPORTED_DIMS
    for name, x in widths.items():
        if x not in dims:
            return False, f"{name}={x} not in {dims}"
    if chunk_size not in (16, 32, 64):
        return False, f"chunk_size={chunk_size} not in (16, 32, 64)"
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        return False, f"dtypes {q.dtype}, {k.dtype}, {v.dtype} not one float dtype"
    return True, ""


_PLANS: dict = {}  # checked call signatures that take the fused path -> (_Cfg, out dtype)


def check_decay_shape(log_decay: Tensor, B: int, T: int, H: int) -> None:
    """A fused op's log_decay: [H] or per token [B, T, H]. Shapes only: a value check would sync every call."""
    if tuple(log_decay.shape) not in ((H,), (B, T, H)):
        raise ValueError(f"log_decay must have shape [H] = [{H}] or [B, T, H] = [{B}, {T}, {H}], got "
                         f"{tuple(log_decay.shape)}")


def fused_dijiang_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj: Tensor,
    log_weight: Tensor | None,
    log_decay: Tensor,
    *,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    eps: float = 1e-6,
    attention_mask: Tensor | None = None,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """DiJiang attention with the softmax feature map fused into the kernels.

    Args:
        q, k: ``[B, T, H, d]`` raw (post-RoPE) queries and keys, k already expanded to H heads.
        v: ``[B, T, H, dv]``.
        proj: ``[d, m]`` frozen projection P (no gradient is computed for it).
        log_weight: ``[H, m]`` learnable log feature weights, or None (zeros).
        log_decay: ``[H]``, or per token ``[B, T, H]`` (as :func:`dijiang.ops.linear_attention`), ``<= 0``.
        scale: attention scale, default ``d ** -0.5``; the logits use ``sqrt(scale)``.
        normalize, initial_state, output_final_state, eps, attention_mask: as
            :func:`dijiang.ops.linear_attention`.
        backend: ``"auto"`` (Triton when supported, else torch), ``"triton"`` (raise if unsupported)
            or ``"torch"`` (separate feature map + the torch chunk op).
        out_dtype: dtype of ``o`` (default ``v.dtype``); float32 keeps sums that are combined further
            (the window hybrid's linear numerator and denominator) unrounded.

    Returns:
        ``(o [B, T, H, dv] in out_dtype, final_state [B, H, m, dv(+1)] float32 or None)``.
    """
    # a call like an earlier one that took the fused path skips the checks below: they are host work done again on
    # every call, and at short lengths host time, not GPU time, is what a call costs
    key = None
    if attention_mask is None:
        key = (q.shape, k.shape, v.shape, proj.shape, None if log_weight is None else log_weight.shape,
               log_decay.shape, None if initial_state is None else initial_state.shape, q.dtype, k.dtype, v.dtype,
               q.is_cuda, scale, normalize, output_final_state, chunk_size, eps, backend, out_dtype,
               SEGMENT_CHUNKS_OVERRIDE, settings.inline_carry(), TUNE.get("warps"))
        plan = _PLANS.get(key)
        if plan is not None:
            o, final, _ = _apply_fused(q, k, v, proj, log_weight, log_decay, initial_state, plan[0],
                                       output_final_state, plan[1], want_den=False)
            return o, final
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} (expand kv heads first), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, dv] = [{B}, {T}, {H}, dv], got {tuple(v.shape)}")
    if T < 1:
        raise ValueError("sequence length T must be >= 1")
    if proj.dim() != 2 or proj.shape[0] != d:
        raise ValueError(f"proj must be [d, m] with d={d}, got {tuple(proj.shape)}")
    m = proj.shape[1]
    if log_weight is not None and tuple(log_weight.shape) != (H, m):
        raise ValueError(f"log_weight must be [H, m] = [{H}, {m}], got {tuple(log_weight.shape)}")
    check_decay_shape(log_decay, B, T, H)
    if initial_state is not None:
        want = (B, H, m, v.shape[-1] + int(normalize))
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be {list(want)}, got {tuple(initial_state.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")

    ok, why = triton_supported(q, k, v, proj, chunk_size)
    if attention_mask is not None:
        ok, why = False, "attention_mask is not supported by the fused kernel"
    if backend == "triton" and not ok:
        raise ValueError(f"fused Triton DiJiang attention cannot run: {why}")
    out_dtype = v.dtype if out_dtype is None else out_dtype
    if backend == "torch" or not ok:
        o, final = torch_dijiang_attention(q, k, v, proj, log_weight, log_decay, scale=scale, normalize=normalize,
                                           initial_state=initial_state, output_final_state=output_final_state,
                                           chunk_size=chunk_size, attention_mask=attention_mask, eps=eps)
        return o.to(out_dtype), final
    cfg = _cfg_for(q, v, proj, scale, eps, normalize, chunk_size, initial_state is None and not output_final_state)
    if len(_PLANS) > 4096:
        _PLANS.clear()
    _PLANS[key] = (cfg, out_dtype)
    o, final, _ = _apply_fused(q, k, v, proj, log_weight, log_decay, initial_state, cfg, output_final_state, out_dtype,
                               want_den=False)
    return o, final


def _apply_fused(q, k, v, proj, log_weight, log_decay, initial_state, cfg, want_final, out_dtype, want_den):
    """The autograd call shared by the public entry points: (o, final state or None, den or None)."""
    if log_weight is None:
        log_weight = q.new_zeros(cfg.H, cfg.M, dtype=torch.float32)
    # Function.apply's Python layer (default-argument binding, unwrapping functorch wrappers) is host time on
    # every call; it is needed only under functorch transforms and for torch.compile's tracing, which then get it
    plain = not (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling())
    apply = _RAW_APPLY if plain else _FusedDiJiang.apply
    o, final, den = apply(q.contiguous(), k.contiguous(), v.contiguous(), proj, log_weight, log_decay, initial_state,
                          (cfg, want_final, out_dtype, want_den))
    return o, (final if want_final else None), (den if want_den else None)


def fused_dijiang_with_denominator(q, k, v, proj, log_weight, log_decay, *, scale, output_final_state=False,
                                   eps=1e-6) -> tuple[Tensor, Tensor, Tensor | None]:
    """Normalised fused DiJiang attention that also returns its denominator, both differentiable.

    Returns ``(o [B, T, H, dv] float32 = num / (den + eps), den [B*H, T] float32, final state
    [B, H, m, dv + 1] or None)``. Triton only (inputs already checked by the caller)."""
    cfg = _cfg_for(q, v, proj, scale, eps, True, 64, not output_final_state)
    o, final, den = _apply_fused(q, k, v, proj, log_weight, log_decay, None, cfg, output_final_state, torch.float32,
                                 want_den=True)
    return o, den, final
