"""Gated delta rule (DeltaNet / Gated DeltaNet's state update) over feature-mapped queries and keys.

Additive linear attention only ever adds k_t v_t^T to its state, so old associations blur into new ones; the
delta rule first reads what the state already holds for k_t and writes only the correction:

    S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T,      o_t = S_t^T q_t

with k_t unit-norm (then I - beta_t k_t k_t^T is a contraction for beta in [0, 1]), gamma_t the layer's decay
and beta_t a per-token write strength. No normaliser. Layout as the other ops: q, k ``[B, T, H, m]``, v
``[B, T, H, dv]``, state ``[B, H, m, dv]`` float32 (fla's ``chunk_gated_delta_rule`` has the same contract, with
``g`` = log gamma and ``scale`` = 1, and runs it on CUDA: ``fla_delta_rule``).

Chunk form (the WY representation, as in DeltaNet's paper): inside a chunk with cumulative log decay b_i and
entering state S0, the state after token i is e^{b_i} S0 + sum_{j<=i} e^{b_i - b_j} k_j u_j^T, where the
written values u solve the unit lower-triangular system

    u_i + beta_i sum_{j<i} e^{b_i - b_j} (k_i . k_j) u_j = beta_i (v_i - e^{b_i} S0^T k_i),

so u = W_v - W_k S0 with W_v, W_k from one triangular solve per chunk that does not depend on S0; only the
chunk-to-chunk state walk is sequential.

Padding (``attention_mask`` 0/False): a padded token writes nothing (its key and value are zeroed), does not decay the state and
gets output 0, as in the additive ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .naive import finish_outputs, prepare_inputs

DELTA_MODES = ("chunk", "recurrent")


def _prepare(q, k, v, log_decay, beta, initial_state, attention_mask):
    """The additive ops' checked float32 inputs (``prepare_inputs``, no normaliser): a padded token's k and v are
    zero, so it writes nothing whatever its beta, and its log decay is 0. Plus beta, checked, float32."""
    prepared = prepare_inputs(q, k, v, log_decay, initial_state, False, attention_mask)
    B, T, H, _ = k.shape
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must have shape [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    return prepared, beta.float()


def recurrent_delta_rule(q, k, v, log_decay, beta, *, initial_state=None, output_final_state=False,
                         attention_mask=None) -> tuple[Tensor, Tensor | None]:
    """Token by token: the reference (and the decode step). Same contract as :func:`delta_rule`."""
    (qf, kf, vf, g, state, mask), beta = _prepare(q, k, v, log_decay, beta, initial_state, attention_mask)
    outputs = []
    for g_t, b_t, q_t, k_t, v_t in zip(*(x.unbind(dim=1) for x in (g, beta, qf, kf, vf))):
        state = torch.exp(g_t)[..., None, None] * state
        read = torch.einsum("bhm,bhmv->bhv", k_t, state)
        state = state + k_t[..., :, None] * (b_t[..., None] * (v_t - read))[..., None, :]
        outputs.append(torch.einsum("bhm,bhmv->bhv", q_t, state))
    o = torch.stack(outputs, dim=1)
    return finish_outputs(o, False, mask, 0.0, v.dtype), (state if output_final_state else None)


def chunk_delta_rule(q, k, v, log_decay, beta, *, chunk_size=64, initial_state=None, output_final_state=False,
                     attention_mask=None) -> tuple[Tensor, Tensor | None]:
    """Chunkwise (training, prefill). Same contract as :func:`delta_rule`."""
    (qf, kf, vf, g, state, mask), beta = _prepare(q, k, v, log_decay, beta, initial_state, attention_mask)
    B, T, H, m = kf.shape
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T  # padded steps: beta 0, no decay, zero q: they change nothing

    def chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = F.pad(x, [0, 0] * (x.dim() - 3) + [0, 0, 0, pad]) if pad else x
        return x.reshape(B, N, C, H, *x.shape[3:]).movedim(3, 1)

    qc, kc, vc, gc, bc = chunks(qf), chunks(kf), chunks(vf), chunks(g), chunks(beta)
    within = gc.cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # decays e^{b_i - b_j} for j <= i, masked before exp so every exponent is <= 0; the solve takes j < i only
    decay_causal = torch.exp((within[..., :, None] - within[..., None, :]).masked_fill(~causal, float("-inf")))
    decay_strict = decay_causal.tril(-1)
    system = torch.eye(C, device=k.device) + bc[..., :, None] * decay_strict * (kc @ kc.transpose(-1, -2))
    rhs = torch.cat([bc[..., None] * vc, (bc * torch.exp(within))[..., None] * kc], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    w_v, w_k = solved[..., :vf.shape[-1]], solved[..., vf.shape[-1]:]  # u = w_v - w_k S0
    scores = (qc @ kc.transpose(-1, -2)) * decay_causal  # [B, H, N, C, C]
    q_decayed = qc * torch.exp(within)[..., None]
    to_end = torch.exp(within[..., -1:] - within)[..., None] * kc  # e^{b_C - b_j} k_j
    outputs = []
    for n in range(N):  # the sequential part: one state per chunk
        u = w_v[:, :, n] - w_k[:, :, n] @ state
        outputs.append(q_decayed[:, :, n] @ state + scores[:, :, n] @ u)
        state = torch.exp(within[:, :, n, -1])[..., None, None] * state + to_end[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2).movedim(1, 3).reshape(B, N * C, H, -1)[:, :T]
    return finish_outputs(o, False, mask, 0.0, v.dtype), (state if output_final_state else None)


def fla_delta_rule(q, k, v, log_decay, beta, *, initial_state=None, output_final_state=False):
    """fla's ``chunk_gated_delta_rule`` (Triton, CUDA) under this module's contract, or its ungated
    ``chunk_delta_rule`` when ``log_decay`` is None; ImportError without fla."""
    common = dict(scale=1.0, initial_state=None if initial_state is None else initial_state.float().contiguous(),
                  output_final_state=output_final_state)
    q, k, beta = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous(), beta.to(v.dtype).contiguous()
    if log_decay is None:
        from fla.ops.delta_rule import chunk_delta_rule

        o, state = chunk_delta_rule(q, k, v.contiguous(), beta, **common)
        return o.to(v.dtype), state
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, H, _ = k.shape
    g = log_decay.float()
    g = g.expand(B, T, H).contiguous() if g.dim() == 1 else g.contiguous()
    o, state = chunk_gated_delta_rule(q, k, v.contiguous(), g, beta, **common)
    return o.to(v.dtype), state


@functools.cache
def fla_unusable(gated: bool = True) -> str | None:
    """Why fla's delta rule (gated: ``chunk_gated_delta_rule``, else ``chunk_delta_rule``) cannot train here (None:
    it can): fla missing or failing to import, or, gated, the combination fla itself refuses in the backward, a
    Hopper GPU under Triton 3.4-3.7.0 without tilelang (fla issue #640, wrong gradients; the H200 image's Triton 3.6
    is one). The ungated kernel's backward takes no decay and is not refused."""
    import importlib
    import importlib.util

    try:  # only the kernel asked for: the ungated one must not hinge on the gated module importing
        importlib.import_module("fla.ops.gated_delta_rule" if gated else "fla.ops.delta_rule")
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception as error:  # fla missing, or its Triton import failing on this machine
        return f"fla does not import ({type(error).__name__}: {error})"
    if (gated and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
            and not importlib.util.find_spec("tilelang")):
        return "fla refuses the gated backward on Hopper with Triton >= 3.4, < 3.7.1 and no tilelang (fla #640)"
    return None


def fla_available(gated: bool = True) -> bool:
    return fla_unusable(gated) is None


def delta_rule(q, k, v, log_decay, beta, *, mode="chunk", chunk_size=64, initial_state=None,
               output_final_state=False, attention_mask=None, backend="auto") -> tuple[Tensor, Tensor | None]:
    """Gated delta rule over feature-mapped q, k (see the module docstring).

    Args:
        q, k: ``[B, T, H, m]``, any float dtype (fla gets them in v's); k should be unit-norm (the layer
            normalises both).
        v: ``[B, T, H, dv]``.
        log_decay: ``[H]`` or ``[B, T, H]``, all ``<= 0``; None: no decay (DeltaNet's rule; fla's ungated kernel).
        beta: ``[B, T, H]`` write strengths in [0, 1].
        mode: ``"chunk"`` or ``"recurrent"`` (token by token, decode).
        backend: ``"auto"`` runs fla's Triton kernel on CUDA where fla is installed and nothing is padded (with
            no decay, only for bfloat16 / float16 v: fla's ungated kernel refuses float32); ``"torch"`` always
            the forms here.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, dv]`` in ``v.dtype``; final_state ``[B, H, m, dv]`` float32 or None.
    """
    if mode not in DELTA_MODES:
        raise ValueError(f"the delta rule runs in mode 'chunk' or 'recurrent', got {mode!r}")
    common = dict(initial_state=initial_state, output_final_state=output_final_state)
    # fla's ungated chunk_delta_rule asserts half-precision inputs: float32 takes the forms here
    if (backend == "auto" and mode == "chunk" and q.is_cuda and attention_mask is None
            and (log_decay is not None or v.dtype != torch.float32) and fla_available(gated=log_decay is not None)):
        return fla_delta_rule(q, k, v, log_decay, beta, **common)
    if log_decay is None:
        log_decay = q.new_zeros(q.shape[2], dtype=torch.float32)
    if mode == "recurrent":
        return recurrent_delta_rule(q, k, v, log_decay, beta, attention_mask=attention_mask, **common)
    return chunk_delta_rule(q, k, v, log_decay, beta, chunk_size=chunk_size, attention_mask=attention_mask, **common)
