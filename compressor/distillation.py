"""The distillation loss (Hinton et al. 2015) as the paper uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def check_distillation_settings(temperature: float, alpha: float) -> None:
    """Raise ValueError for a temperature that is not positive or an alpha outside [0, 1]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, target) + alpha * T^2 * KL(p_teacher^T || p_student^T)``.

    Logits are ``(N, C)`` (any leading dimensions are flattened) and computed on in fp32.
    Positions whose target equals ``ignore_index`` count in neither term; ``"mean"`` divides
    the sum by the number of counted positions. ``target=None`` is the pure soft-target mode
    (every position counts and ``alpha`` is ignored: the loss is ``T^2 * KL``). The teacher
    never receives gradient. The ``T^2`` factor keeps the soft term's gradients on the scale of
    the hard term's as T grows.
    """
    check_distillation_settings(temperature, alpha)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (do the vocabularies match?)"
        )
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes).float()
    teacher = teacher_logits.detach().reshape(-1, classes).float()
    if target is None:
        keep = None
        soft_weight, hard_weight = 1.0, 0.0
    else:
        target = target.reshape(-1)
        if target.numel() != student.shape[0]:
            raise ValueError(
                f"target has {target.numel()} positions, logits have {student.shape[0]}"
            )
        keep = target != ignore_index
        student, teacher, target = student[keep], teacher[keep], target[keep]
        soft_weight, hard_weight = alpha, 1.0 - alpha

    total = student.new_zeros(())
    if hard_weight > 0:
        total = total + hard_weight * F.cross_entropy(student, target, reduction="sum")
    if soft_weight > 0:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        total = total + soft_weight * temperature**2 * kl
    if reduction == "sum":
        return total
    return total / max(student.shape[0], 1)
