"""Quadratic reference for decayed linear attention, plus the input handling all forms share.

    o_t = sum_{j<=t} exp(decay(j, t)) (q_t . k_j) v_j,   decay(j, t) = sum_{j<s<=t} g_s,   g_s = log_decay_h

With ``normalize=True`` the same sum with v replaced by 1 is the denominator. The forms carry v
augmented with a ones column, so the state then is ``[B, H, m, dv + 1]`` and its last column is the
normaliser.

Padding (``attention_mask`` 0/False): a padded token has g_s = 0 (it does not advance time, so it
does not decay the state), zero key and value (no numerator or normaliser contribution) and output 0.
With left padding and a zero initial state the real tokens get exactly the unpadded results.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _skip_value_checks() -> bool:
    """Data-dependent checks would break torch.compile graphs or CUDA graph capture."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_log_decay(log_decay: Tensor, num_heads: int) -> None:
    if not isinstance(log_decay, Tensor) or log_decay.dim() != 1 or log_decay.shape[0] != num_heads:
        shape = tuple(log_decay.shape) if isinstance(log_decay, Tensor) else type(log_decay).__name__
        raise ValueError(f"log_decay must have shape [H] = [{num_heads}], got {shape}")
    check_log_decay_sign(log_decay)


def check_log_decay_sign(log_decay: Tensor) -> None:
    if not _skip_value_checks() and bool(torch.any(log_decay > 0)):
        raise ValueError("log_decay must be <= 0 (decay gamma = exp(log_decay) in (0, 1])")


def check_head_or_token_log_decay(log_decay, batch: int, seq_len: int, heads: int) -> None:
    """[H] (one decay per head) or [B, T, H] (one per token and head, e.g. a data-dependent gate); all <= 0."""
    if isinstance(log_decay, Tensor) and log_decay.dim() == 3:
        if tuple(log_decay.shape) != (batch, seq_len, heads):
            raise ValueError(f"a per-token log_decay must have shape [B, T, H] = [{batch}, {seq_len}, {heads}], "
                             f"got {tuple(log_decay.shape)}")
        check_log_decay_sign(log_decay)
        return
    check_log_decay(log_decay, heads)


def check_attention_mask(attention_mask: Tensor | None, batch: int, seq_len: int) -> None:
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"attention_mask must have shape [B, T] = [{batch}, {seq_len}], got {tuple(attention_mask.shape)}"
        )


def check_rank4(**tensors: Tensor) -> None:
    for name, x in tensors.items():
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")


def check_same_bth(**tensors: Tensor) -> tuple[int, int, int]:
    (first_name, first), *rest = tensors.items()
    for name, x in rest:
        if x.shape[:3] != first.shape[:3]:
            raise ValueError(
                f"{first_name} and {name} must agree on [B, T, H]: {tuple(first.shape[:3])} vs {tuple(x.shape[:3])}"
            )
    batch, seq_len, heads = first.shape[:3]
    if seq_len < 1:
        raise ValueError("sequence length T must be >= 1")
    return batch, seq_len, heads


def validate_inputs(q, k, v, log_decay, initial_state, normalize, attention_mask) -> None:
    check_rank4(q=q, k=k, v=v)
    batch, seq_len, heads = check_same_bth(q=q, k=k, v=v)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k feature dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    check_head_or_token_log_decay(log_decay, batch, seq_len, heads)
    state_cols = v.shape[-1] + (1 if normalize else 0)
    expected_state = (batch, heads, k.shape[-1], state_cols)
    if initial_state is not None and tuple(initial_state.shape) != expected_state:
        hint = " (normalize=True adds a normaliser column)" if normalize else ""
        raise ValueError(
            f"initial_state must have shape [B, H, m, dv{' + 1' if normalize else ''}] = {list(expected_state)}"
            f"{hint}, got {tuple(initial_state.shape)}"
        )
    check_attention_mask(attention_mask, batch, seq_len)


class Prepared(NamedTuple):
    q: Tensor  # [B, T, H, m] float32
    k: Tensor  # [B, T, H, m] float32, zero at padding
    v: Tensor  # [B, T, H, dv(+1)] float32, ones column appended when normalising, zero at padding
    log_decay: Tensor  # [B, T, H] float32 per-token log decay, 0 at padding
    state: Tensor  # [B, H, m, dv(+1)] float32
    mask: Tensor | None  # [B, T] bool


def prepare_inputs(q, k, v, log_decay, initial_state, normalize, attention_mask) -> Prepared:
    """Checked (`validate_inputs`) float32 inputs of every form: padded tokens zeroed, v augmented when normalised."""
    validate_inputs(q, k, v, log_decay, initial_state, normalize, attention_mask)
    batch, seq_len, heads, _ = q.shape
    q, k, v = q.float(), k.float(), v.float()
    if normalize:
        v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
    token_log_decay = log_decay.float().expand(batch, seq_len, heads)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(device=q.device, dtype=torch.bool)
        real = mask[:, :, None].float()
        k, v = k * real[..., None], v * real[..., None]
        token_log_decay = token_log_decay * real
    if initial_state is None:
        state = q.new_zeros(batch, heads, k.shape[-1], v.shape[-1])
    else:
        state = initial_state.float()
    return Prepared(q, k, v, token_log_decay, state, mask)


def finish_outputs(o: Tensor, normalize: bool, mask: Tensor | None, eps: float, dtype: torch.dtype) -> Tensor:
    """o: [B, T, H, dv(+1)] float32 -> [B, T, H, dv] in ``dtype``."""
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    if mask is not None:
        o = o * mask[:, :, None, None]
    return o.to(dtype)


def naive_linear_attention(
    q, k, v, log_decay, *, initial_state=None, output_final_state=False, normalize=False, attention_mask=None, eps=1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Materialises the [T, T] decay-masked score matrix. For tests and short sequences only.
    The contract (shapes, dtypes, state) is :func:`dijiang.ops.linear_attention`'s."""
    qf, kf, vf, g, state, mask = prepare_inputs(q, k, v, log_decay, initial_state, normalize, attention_mask)
    seq_len = q.shape[1]
    cum = g.cumsum(dim=1)  # [B, T, H]: log decay from before the first token through token t
    exponent = cum[:, :, None, :] - cum[:, None, :, :]  # [B, t, j, H] = decay(j, t)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    exponent = exponent.masked_fill(~causal[None, :, :, None], float("-inf"))
    weights = torch.exp(exponent) * torch.einsum("bthm,bjhm->btjh", qf, kf)
    o = torch.einsum("btjh,bjhv->bthv", weights, vf)
    o = o + torch.exp(cum)[..., None] * torch.einsum("bthm,bhmv->bthv", qf, state)
    final_state = None
    if output_final_state:
        to_end = torch.exp(cum[:, -1:, :] - cum)  # [B, T, H]
        final_state = torch.exp(cum[:, -1])[:, :, None, None] * state
        final_state = final_state + torch.einsum("bjhm,bjh,bjhv->bhmv", kf, to_end, vf)
    return finish_outputs(o, normalize, mask, eps, v.dtype), final_state
