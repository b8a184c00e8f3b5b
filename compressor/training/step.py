"""One training step for every algorithm: quantized distillation (frozen teacher),
quantization-aware training on labels (no teacher), differentiable quantization (learned
points), and the three QKD phases (co-studying: the teacher learns from the student too).

The student carries quantization parametrizations (:func:`compressor.quantize_`), so every
forward pass reads the quantized weights and the optimizer updates the full-precision shadow
weights (or the learned points) through the straight-through gradient. Any model and any
logits work: a plugin supplies ``forward(model, inputs) -> logits`` or its own ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.surgery.quantize import quantize_once
from compressor.training.distillation import (
    TopKLogits,
    check_distillation_settings,
    combine_terms,
    distillation_terms,
)

Forward = Callable[[nn.Module, Any], torch.Tensor]
# loss_fn(student_logits, teacher_logits or None, target) -> scalar loss to back-propagate
LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def _default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(inputs)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings: ``temperature`` T > 0 and ``alpha`` in [0, 1], the weight of the
    soft (teacher) term (``alpha=0`` trains on the labels alone); ``label_smoothing`` of the
    hard (label) term."""

    temperature: float = 1.0
    alpha: float = 0.7
    ignore_index: int = -100
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_distillation_settings(self.temperature, self.alpha)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


def freeze_(model: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients: how a teacher is held during distillation."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model


def distill_step(
    student: nn.Module,
    teacher: nn.Module | torch.Tensor | TopKLogits | None,
    inputs: Any,
    target: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    forward: Forward | None = None,
    loss_fn: LossFn | None = None,
    teacher_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """One training step of the student, for every algorithm.

    - ``teacher`` a module, no ``teacher_optimizer``: quantized distillation (Algorithm 1,
      QKD's tutoring): the frozen teacher runs on the same batch without gradients.
    - ``teacher`` a module with ``teacher_optimizer``: QKD's co-studying: the student learns
      from the teacher and, in the same step, the teacher from the student (same loss with
      the roles swapped), so that it becomes quantization-friendly.
    - ``teacher`` logits (a tensor or :class:`TopKLogits`) computed ahead: no teacher runs.
    - ``teacher=None``: quantization-aware training on the labels (QKD's self-studying).

    ``loss_fn(student_logits, teacher_logits, target)`` replaces the default loss
    (:func:`distillation_loss` with ``config``; cross-entropy without a teacher), e.g. for a
    summed, token-normalised loss. Returns the loss, its distillation term ``T^2 * KL`` (mean
    per counted position; NaN without a teacher) and, in co-studying, the teacher's loss.
    """
    if teacher is None and target is None and loss_fn is None:
        raise ValueError("without a teacher, distill_step needs labels (target is None)")
    if teacher_optimizer is not None and not isinstance(teacher, nn.Module):
        raise ValueError("a teacher_optimizer needs the teacher as a module (co-studying)")
    forward = forward or _default_forward
    co_studying = teacher_optimizer is not None
    student.train()
    optimizer.zero_grad(set_to_none=True)
    if co_studying:
        teacher.train()
        teacher_optimizer.zero_grad(set_to_none=True)
    with quantize_once():  # quantize each weight once per step, however often the model reads it
        student_logits = forward(student, inputs)
        teacher_logits = None
        if isinstance(teacher, nn.Module):
            with torch.set_grad_enabled(co_studying):
                teacher_logits = forward(teacher, inputs)
        elif teacher is not None:
            teacher_logits = teacher
        loss, soft = _student_loss(student_logits, teacher_logits, target, config, loss_fn)
        if not torch.isfinite(loss.detach()):  # before the update spoils the weights
            raise FloatingPointError(f"the loss became {loss.item()} (diverged)")
        loss.backward()
    optimizer.step()
    record = {"loss": loss.item(), "distillation": soft}
    if co_studying:
        teacher_loss, _ = _student_loss(
            teacher_logits, student_logits.detach(), target, config, loss_fn
        )
        teacher_loss.backward()
        teacher_optimizer.step()
        record["teacher_loss"] = teacher_loss.item()
    return record


def _student_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits | None,
    target: torch.Tensor | None,
    config: DistillConfig,
    loss_fn: LossFn | None,
) -> tuple[torch.Tensor, float]:
    """The loss of ``logits`` learning from ``teacher_logits`` (detached), and its soft term."""
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = teacher_logits.detach()
    if loss_fn is not None:
        loss = loss_fn(logits, teacher_logits, target)
        if teacher_logits is None:
            return loss, float("nan")
        with torch.no_grad():  # a custom loss does not expose its terms
            terms = distillation_terms(
                logits, teacher_logits, target, config.temperature, config.ignore_index, hard=False
            )
        return loss, float(terms.soft) / max(terms.count, 1)
    if teacher_logits is None:
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=config.ignore_index,
            label_smoothing=config.label_smoothing,
        )
        return loss, float("nan")
    terms = distillation_terms(
        logits,
        teacher_logits,
        target,
        config.temperature,
        config.ignore_index,
        label_smoothing=config.label_smoothing,
    )
    return combine_terms(terms, config.alpha), float(terms.soft.detach()) / max(terms.count, 1)


def cycle(batches: Iterable) -> Iterator:
    """Repeat an iterable of batches (a DataLoader) for as many steps as asked."""
    while True:
        yield from batches
