"""The distillation loss (Hinton et al. 2015) as the paper uses it."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def check_distillation_settings(temperature: float, alpha: float) -> None:
    """Raise ValueError for a temperature that is not positive or an alpha outside [0, 1]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


class TopKLogits(NamedTuple):
    """A teacher's ``k`` largest logits per position and their classes: a compact stand-in
    for full logits (``k`` values instead of the vocabulary), e.g. to store a teacher's outputs
    once per data set. Distilling from it renormalises the teacher over those ``k`` classes."""

    values: torch.Tensor  # (..., k)
    indices: torch.Tensor  # (..., k), int64

    @classmethod
    def of(cls, logits: torch.Tensor, k: int) -> TopKLogits:
        values, indices = logits.detach().topk(min(k, logits.shape[-1]), dim=-1)
        return cls(values, indices)


class DistillationTerms(NamedTuple):
    """The two summed terms of the loss over the counted positions, and their number."""

    hard: torch.Tensor | None  # sum of CE(student, target); None without labels
    soft: torch.Tensor | None  # sum of T^2 * KL(p_teacher^T || p_student^T); None if not asked
    count: int


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits,
    target: torch.Tensor | None,
    temperature: float,
    ignore_index: int = -100,
    hard: bool = True,
    soft: bool = True,
) -> DistillationTerms:
    """Each term of :func:`distillation_loss` once, summed over the positions whose target is
    not ``ignore_index`` (every position when ``target`` is None), computed in fp32."""
    classes = student_logits.shape[-1]
    top_k = isinstance(teacher_logits, TopKLogits)
    teacher_shape = teacher_logits.values.shape[:-1] if top_k else teacher_logits.shape
    if (student_logits.shape[:-1] if top_k else student_logits.shape) != teacher_shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_shape)} differ in shape (do the vocabularies match?)"
        )
    student = student_logits.reshape(-1, classes).float()
    if top_k:
        k = teacher_logits.values.shape[-1]
        teacher = teacher_logits.values.detach().reshape(-1, k).float()
        indices = teacher_logits.indices.reshape(-1, k)
    else:
        teacher = teacher_logits.detach().reshape(-1, classes).float()
    if target is not None:
        target = target.reshape(-1)
        if target.numel() != student.shape[0]:
            raise ValueError(
                f"target has {target.numel()} positions, logits have {student.shape[0]}"
            )
        keep = target != ignore_index
        student, teacher, target = student[keep], teacher[keep], target[keep]
        if top_k:
            indices = indices[keep]
    hard_sum = None
    if hard and target is not None:
        hard_sum = F.cross_entropy(student, target, reduction="sum")
    soft_sum = None
    if soft:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        if top_k:  # the teacher renormalised over its k classes, the student over all
            log_p_student = log_p_student.gather(-1, indices.long())
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        soft_sum = temperature**2 * kl
    return DistillationTerms(hard_sum, soft_sum, student.shape[0])


def combine_terms(terms: DistillationTerms, alpha: float, reduction: str = "mean") -> torch.Tensor:
    """``(1 - alpha) * hard + alpha * soft`` (only ``soft`` without labels), summed or averaged
    over the counted positions."""
    weights = (1.0 - alpha, alpha) if terms.hard is not None else (0.0, 1.0)
    total = None
    for weight, term in zip(weights, (terms.hard, terms.soft)):
        if weight > 0 and term is not None:
            total = weight * term if total is None else total + weight * term
    if total is None:
        raise ValueError("no loss term to combine (alpha and the available terms leave none)")
    return total if reduction == "sum" else total / max(terms.count, 1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits,
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
    the hard term's as T grows. A :class:`TopKLogits` teacher stands in for its full logits:
    its distribution is renormalised over its ``k`` classes (with ``k`` = the number of
    classes this is exactly the full loss).
    """
    check_distillation_settings(temperature, alpha)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    labelled = target is not None
    terms = distillation_terms(
        student_logits,
        teacher_logits,
        target,
        temperature,
        ignore_index,
        hard=labelled and alpha < 1,
        soft=not labelled or alpha > 0,
    )
    return combine_terms(terms, alpha, reduction)
