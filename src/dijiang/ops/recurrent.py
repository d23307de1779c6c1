"""Token-by-token decayed linear attention (the decode path):  S_t = gamma_t S_{t-1} + k_t^T v_t,  o_t = q_t S_t."""

from __future__ import annotations

import torch
from torch import Tensor

from .naive import finish_outputs, prepare_inputs


def recurrent_linear_attention(
    q, k, v, log_decay, *, initial_state=None, output_final_state=False, normalize=False, attention_mask=None, eps=1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as :func:`dijiang.ops.linear_attention`; state ``[B, H, m, dv(+1)]`` float32."""
    qf, kf, vf, g, state, mask = prepare_inputs(q, k, v, log_decay, initial_state, normalize, attention_mask)
    outputs = []
    # unbind, not indexing: each index's backward would allocate a full-size gradient (O(T^2))
    for decay, q_t, k_t, v_t in zip(*(x.unbind(dim=1) for x in (torch.exp(g), qf, kf, vf))):
        state = decay[:, :, None, None] * state + k_t[..., :, None] * v_t[..., None, :]
        outputs.append(torch.einsum("bhm,bhmv->bhv", q_t, state))
    o = torch.stack(outputs, dim=1)
    return finish_outputs(o, normalize, mask, eps, v.dtype), (state if output_final_state else None)
