"""Decayed linear attention kernels (pure torch): parallel reference, chunkwise, recurrent; and the
sliding-window + linear hybrid.

Layout is fla style: q, k ``[B, T, H, m]``, v ``[B, T, H, dv]``, states ``[B, H, m, dv]`` (float32).
"""

from __future__ import annotations

from torch import Tensor

from .chunk import chunk_linear_attention
from .naive import naive_linear_attention
from .recurrent import recurrent_linear_attention
from .window import (
    chunk_window_attention,
    naive_window_attention,
    recurrent_window_attention,
    window_attention,
)

MODES = ("parallel", "chunk", "recurrent")

__all__ = [
    "MODES",
    "linear_attention",
    "naive_linear_attention",
    "chunk_linear_attention",
    "recurrent_linear_attention",
    "window_attention",
    "naive_window_attention",
    "chunk_window_attention",
    "recurrent_window_attention",
]


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    normalize: bool = False,
    attention_mask: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention with a per-head (or per-token) decay.

        o_t = sum_{j<=t} exp((t - j) * log_decay_h) (q_t . k_j) v_j

    A per-token decay (``log_decay`` [B, T, H], a data-dependent gate as in GLA) replaces (t - j) log_decay_h
    by the sum of log_decay over steps j + 1 .. t: step s decays the state before token s is added.

    Args:
        q, k: ``[B, T, H, m]`` feature-mapped queries and keys.
        v: ``[B, T, H, dv]``.
        log_decay: ``[H]`` or ``[B, T, H]``, all ``<= 0``; receives gradients in every mode.
        mode: ``"parallel"`` (quadratic reference), ``"chunk"`` (training/prefill) or
            ``"recurrent"`` (token by token, decode).
        chunk_size: chunk length for ``mode="chunk"``.
        initial_state: state returned by a previous call; carrying it equals one long call.
        output_final_state: also return the state after the last token.
        normalize: divide by the same sum with v replaced by 1, plus ``eps``. The state is then
            ``[B, H, m, dv + 1]``: v is augmented with a ones column, the last column is the normaliser.
        attention_mask: ``[B, T]``, 1/True for real tokens. Padded tokens contribute nothing, do not
            decay the state (time does not advance over them) and get output 0.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, dv]`` in ``v.dtype``; final_state float32 or None.
        All accumulation is float32 whatever the input dtype.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    common = dict(
        initial_state=initial_state,
        output_final_state=output_final_state,
        normalize=normalize,
        attention_mask=attention_mask,
        eps=eps,
    )
    if mode == "chunk":
        return chunk_linear_attention(q, k, v, log_decay, chunk_size=chunk_size, **common)
    if mode == "recurrent":
        return recurrent_linear_attention(q, k, v, log_decay, **common)
    return naive_linear_attention(q, k, v, log_decay, **common)
