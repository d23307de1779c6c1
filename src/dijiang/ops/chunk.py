"""Chunkwise decayed linear attention: quadratic inside a chunk, a carried state across chunks.

Work O(T * chunk_size * m); memory beyond inputs/outputs is the per-chunk temporaries
([B, H, T/C, C, C] scores) plus one [m, dv] state per chunk. Every decay exponent is a difference
b_t - b_j (j <= t) of an in-chunk cumulative log decay, masked to -inf before ``exp``, so it is <= 0:
no gamma^-n is ever formed and long sequences cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .naive import finish_outputs, prepare_inputs


def _to_chunks(x: Tensor, num_chunks: int, chunk_size: int) -> Tensor:
    """[B, N*C, H, ...] -> [B, H, N, C, ...]."""
    batch, _, heads = x.shape[:3]
    x = x.reshape(batch, num_chunks, chunk_size, heads, *x.shape[3:])
    return x.movedim(3, 1)


def _from_chunks(x: Tensor) -> Tensor:
    """[B, H, N, C, D] -> [B, N*C, H, D]."""
    batch, heads, num_chunks, chunk_size, dim = x.shape
    return x.movedim(1, 3).reshape(batch, num_chunks * chunk_size, heads, dim)


def _pad_time(x: Tensor, pad: int) -> Tensor:
    if pad == 0:
        return x
    padding = [0, 0] * (x.dim() - 2) + [0, pad]  # F.pad lists dims last-first; dim 1 is time
    return F.pad(x, padding)


def chunk_states(chunk_decay: Tensor, chunk_updates: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """States entering each chunk and after the last.

    chunk_decay: [B, H, N] decay factor across each chunk; chunk_updates: [B, H, N, m, dv].
    """
    entering = []
    # unbind, not indexing: each index's backward would allocate a full-size gradient (O(N^2))
    for decay, update in zip(chunk_decay.unbind(dim=2), chunk_updates.unbind(dim=2)):
        entering.append(state)
        state = decay[:, :, None, None] * state + update
    return torch.stack(entering, dim=2), state


def chunk_linear_attention(
    q, k, v, log_decay, *, chunk_size=64, initial_state=None, output_final_state=False, normalize=False,
    attention_mask=None, eps=1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as :func:`dijiang.ops.linear_attention`; state ``[B, H, m, dv(+1)]`` float32."""
    qf, kf, vf, g, state, mask = prepare_inputs(q, k, v, log_decay, initial_state, normalize, attention_mask)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    seq_len = q.shape[1]
    chunk_size = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len  # zero k, v and log decay at the end change nothing
    qc, kc, vc, gc = (_to_chunks(_pad_time(x, pad), num_chunks, chunk_size) for x in (qf, kf, vf, g))

    within = gc.cumsum(dim=-1)  # [B, H, N, C]: log decay from the chunk start through token i
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    exponent = (within[..., :, None] - within[..., None, :]).masked_fill(~causal, float("-inf"))
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp(exponent)
    o = scores @ vc

    to_chunk_end = torch.exp(within[..., -1:] - within)  # [B, H, N, C]
    chunk_updates = (kc * to_chunk_end[..., None]).transpose(-1, -2) @ vc  # [B, H, N, m, dv]
    entering, final_state = chunk_states(torch.exp(within[..., -1]), chunk_updates, state)
    o = o + (qc * torch.exp(within)[..., None]) @ entering

    o = _from_chunks(o)[:, :seq_len]
    return finish_outputs(o, normalize, mask, eps, v.dtype), (final_state if output_final_state else None)
