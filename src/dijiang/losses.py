"""Training losses: next-token LM, distillation from a frozen teacher, attention transfer.

Logits are `[B, T, V]`, token ids `[B, T]`, `mask` (optional) `[B, T]` with 1 for real tokens.
Every loss is a mean over the real tokens of the batch (not a mean of per-sequence means).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of position t's logits against token t+1 (shift by one)."""
    targets = input_ids[:, 1:]
    if mask is not None:
        # a target counts only if both the predicting token and the predicted token are real
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        targets = targets.masked_fill(~keep, -100)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions, times T^2.

    Every position carries a next-token distribution, so no shift is needed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows_s, rows_t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    pieces = []
    for s, t in zip(rows_s.split(KD_ROWS), rows_t.split(KD_ROWS)):
        if torch.is_grad_enabled() and s.requires_grad:
            # recompute the fp32 softmaxes in the backward: they would otherwise keep several
            # [tokens, vocab] fp32 tensors alive (GiBs at 16 x 1024 tokens and a 49k vocabulary)
            pieces.append(torch.utils.checkpoint.checkpoint(_kl_rows, s, t, temperature, use_reentrant=False))
        else:
            pieces.append(_kl_rows(s, t, temperature))
    per_token = torch.cat(pieces).view(student_logits.shape[:-1])
    if mask is None:
        mean = per_token.mean()
    else:
        weights = mask.to(per_token.dtype)
        mean = (per_token * weights).sum() / weights.sum().clamp_min(1)
    return mean * temperature**2


KD_ROWS = 2048  # token positions per piece of the KD loss


def _kl_rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student_rows.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_rows.float() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kd_weight: float = 1.0,
    lm_weight: float = 0.2,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """`kd_weight * KD + lm_weight * LM`; returns {"loss", "kd", "lm"} (parts with weight 0 are skipped)."""
    parts: dict[str, torch.Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if kd_weight:
        if teacher_logits is None:
            raise ValueError("kd_weight > 0 needs teacher logits")
        parts["kd"] = kd_loss(student_logits, teacher_logits, temperature, mask)
        total = total + kd_weight * parts["kd"]
    if lm_weight:
        parts["lm"] = lm_loss(student_logits, input_ids, mask)
        total = total + lm_weight * parts["lm"]
    if not parts:
        raise ValueError("kd_weight and lm_weight are both 0: nothing to train on")
    parts["loss"] = total
    return parts


def attention_transfer_loss(
    student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor]
) -> torch.Tensor:
    """Mean over layers of the MSE between student and teacher attention outputs."""
    if len(student_outputs) != len(teacher_outputs) or not student_outputs:
        raise ValueError(
            f"need one teacher output per student output, got {len(student_outputs)} and {len(teacher_outputs)}"
        )
    per_layer = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_outputs, teacher_outputs)]
    return torch.stack(per_layer).mean()
