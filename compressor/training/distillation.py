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
    once per data set.

    With ``log_normalizer`` (the full logits' ``logsumexp(logits / temperature)``, one value
    per position, which :meth:`of` records when given the temperature) the other classes are
    kept as one merged class holding the rest of the teacher's probability, and distilling
    from it is the exact KL between the two distributions coarsened to those ``k + 1`` classes.
    Without it the teacher is renormalised over its ``k`` classes."""

    values: torch.Tensor  # (..., k)
    indices: torch.Tensor  # (..., k), int64
    log_normalizer: torch.Tensor | None = None  # (...,)
    temperature: float | None = None  # that log_normalizer's

    @classmethod
    def of(cls, logits: torch.Tensor, k: int, temperature: float | None = None) -> TopKLogits:
        logits = logits.detach()
        values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
        if temperature is None:
            return cls(values, indices)
        log_normalizer = torch.logsumexp(logits.float() / temperature, dim=-1)
        return cls(values, indices, log_normalizer, temperature)


def _top_k_kl(
    log_p_student: torch.Tensor,
    teacher: torch.Tensor,
    indices: torch.Tensor,
    log_normalizer: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Summed KL(teacher || student) over a top-k teacher's classes (plus the merged rest)."""
    log_q = log_p_student.gather(-1, indices)
    if log_normalizer is None or indices.shape[-1] == log_p_student.shape[-1]:
        # Renormalised over the k classes (exact when they are all the classes).
        return F.kl_div(
            log_q, F.log_softmax(teacher / temperature, dim=-1), log_target=True, reduction="sum"
        )
    log_p = teacher / temperature - log_normalizer[:, None]
    # The rest of each side's mass, kept away from 0 so that 0 * log 0 stays 0; from the k
    # classes alone, so the vocabulary-wide work is the student's log-softmax only.
    tiny = torch.finfo(log_p.dtype).tiny
    log_p_rest = torch.log((1 - log_p.exp().sum(-1)).clamp_min(tiny))
    log_q_rest = torch.log((1 - log_q.exp().sum(-1)).clamp_min(tiny))
    log_p = torch.cat([log_p, log_p_rest[:, None]], dim=-1)
    log_q = torch.cat([log_q, log_q_rest[:, None]], dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


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
    label_smoothing: float = 0.0,
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
        indices = teacher_logits.indices.reshape(-1, k).long()
        normalizer = teacher_logits.log_normalizer
        if normalizer is not None:
            if teacher_logits.temperature != temperature:
                raise ValueError(
                    f"the top-k teacher's normalizer is for temperature "
                    f"{teacher_logits.temperature}, the loss uses {temperature}"
                )
            normalizer = normalizer.reshape(-1).float()
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
            normalizer = normalizer[keep] if normalizer is not None else None
    hard_sum = None
    if hard and target is not None:
        hard_sum = F.cross_entropy(
            student, target, reduction="sum", label_smoothing=label_smoothing
        )
    soft_sum = None
    if soft:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        if top_k:
            kl = _top_k_kl(log_p_student, teacher, indices, normalizer, temperature)
        else:
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
    the hard term's as T grows. A :class:`TopKLogits` teacher stands in for its full logits
    (with ``k`` = the number of classes the loss is exactly the full one).
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
