"""Each loss against an independent (loop / float64 / torch-builtin) computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from dijiang.losses import attention_transfer_loss, distillation_loss, kd_loss, lm_loss


def _logits(seed, shape=(2, 5, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_lm_loss_matches_a_loop_over_positions():
    logits, ids = _logits(0), torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    terms = [-torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]] for b in range(2) for t in range(4)]
    assert lm_loss(logits, ids).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_lm_loss_skips_padding_targets():
    logits, ids = _logits(0), torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pairs = [(0, t) for t in range(4)] + [(1, 0), (1, 1)]
    terms = [-torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]] for b, t in pairs]
    assert lm_loss(logits, ids, mask).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_is_token_mean_kl_teacher_to_student_times_t_squared(temperature):
    student, teacher = _logits(2), _logits(3)
    total = 0.0
    for b in range(2):
        for t in range(5):
            p = [math.exp(x / temperature) for x in teacher[b, t].tolist()]
            q = [math.exp(x / temperature) for x in student[b, t].tolist()]
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = total / 10 * temperature**2
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_with_mask_matches_torch_kl_div_over_real_tokens():
    student, teacher = _logits(4), _logits(5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = mask.bool()
    reference = F.kl_div(F.log_softmax(student[keep], -1), F.log_softmax(teacher[keep], -1),
                         log_target=True, reduction="batchmean")
    assert kd_loss(student, teacher, 1.0, mask).item() == pytest.approx(reference.item(), rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_rejects_bad_temperature():
    logits = _logits(6)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        kd_loss(logits, logits, temperature=0)


def test_distillation_loss_is_the_weighted_sum_of_its_parts():
    student, teacher = _logits(7), _logits(8)
    ids = torch.randint(0, 7, (2, 5))
    parts = distillation_loss(student, teacher, ids, kd_weight=0.7, lm_weight=0.3, temperature=2.0)
    expected = 0.7 * kd_loss(student, teacher, 2.0) + 0.3 * lm_loss(student, ids)
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"loss", "kd", "lm"}
    lm_only = distillation_loss(student, None, ids, kd_weight=0, lm_weight=1)
    assert set(lm_only) == {"loss", "lm"}
    with pytest.raises(ValueError):
        distillation_loss(student, None, ids, kd_weight=1, lm_weight=0)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, ids, kd_weight=0, lm_weight=0)


def test_attention_transfer_loss_is_mean_of_per_layer_mse():
    student = [torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 2]
    teacher = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    expected = sum(((s.double() - t.double()) ** 2).sum() / s.numel() for s, t in zip(student, teacher)) / 2
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError):
        attention_transfer_loss(student, teacher[:1])


def test_kd_loss_in_pieces_has_the_same_value_and_gradient(monkeypatch):
    import torch

    from dijiang import losses

    torch.manual_seed(0)
    student = torch.randn(3, 7, 11, requires_grad=True)
    teacher = torch.randn(3, 7, 11)
    whole = losses.kd_loss(student, teacher, temperature=2.0)
    (grad_whole,) = torch.autograd.grad(whole, student)
    monkeypatch.setattr(losses, "KD_ROWS", 4)  # 21 rows -> 6 checkpointed pieces
    pieces = losses.kd_loss(student, teacher, temperature=2.0)
    (grad_pieces,) = torch.autograd.grad(pieces, student)
    assert torch.allclose(whole, pieces, atol=1e-6)
    assert torch.allclose(grad_whole, grad_pieces, atol=1e-6)
