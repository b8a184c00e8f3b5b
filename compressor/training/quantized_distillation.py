"""Quantized distillation (Polino et al. 2018, Algorithm 1) as a reusable training step.

The student carries quantization parametrizations (:func:`compressor.quantize_`), so every
forward pass reads the quantized weights and the optimizer updates the full-precision shadow
weights through the straight-through gradient. The teacher is frozen. Any model and any logits
work: a plugin supplies ``forward(model, inputs) -> logits`` and its own data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.surgery.quantize import cached
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
    soft (teacher) term; ``alpha=0`` trains on the labels alone."""

    temperature: float = 1.0
    alpha: float = 0.7
    ignore_index: int = -100

    def __post_init__(self) -> None:
        check_distillation_settings(self.temperature, self.alpha)


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
    forward: Forward = _default_forward,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """One step of Algorithm 1: forward the quantized student and the frozen teacher on the
    same batch, back-propagate the distillation loss to the shadow weights, update them.

    Returns the loss and its distillation term ``T^2 * KL`` (mean per counted position).
    ``teacher`` may also be the teacher's logits on this batch, computed ahead (once per data
    set, say): then no teacher runs. Without a teacher (``teacher=None``) this is plain
    quantization-aware training on the labels. ``loss_fn(student_logits, teacher_logits,
    target)`` replaces the default loss (:func:`distillation_loss` with ``config``;
    cross-entropy without a teacher), e.g. for a summed, token-normalised loss.
    """
    if teacher is None and target is None and loss_fn is None:
        raise ValueError("without a teacher, distill_step needs labels (target is None)")
    student.train()
    optimizer.zero_grad(set_to_none=True)
    with cached():  # quantize each weight once per step, however often the model reads it
        student_logits = forward(student, inputs)
        teacher_logits = None
        soft = float("nan")
        if isinstance(teacher, nn.Module):
            with torch.no_grad():
                teacher_logits = forward(teacher, inputs)
        elif teacher is not None:
            teacher_logits = teacher
        if loss_fn is not None:
            loss = loss_fn(student_logits, teacher_logits, target)
            if teacher_logits is not None:  # a custom loss does not expose its terms
                with torch.no_grad():
                    terms = distillation_terms(
                        student_logits, teacher_logits, target, config.temperature,
                        config.ignore_index, hard=False,
                    )  # fmt: skip
                soft = float(terms.soft) / max(terms.count, 1)
        elif teacher is None:
            loss = nn.functional.cross_entropy(
                student_logits.reshape(-1, student_logits.shape[-1]).float(),
                target.reshape(-1),
                ignore_index=config.ignore_index,
            )
        else:  # both terms once: the soft one is also what the step reports
            terms = distillation_terms(
                student_logits, teacher_logits, target, config.temperature, config.ignore_index
            )
            loss = combine_terms(terms, config.alpha)
            soft = float(terms.soft.detach()) / max(terms.count, 1)
        loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "distillation": soft}


def cycle(batches: Iterable) -> Iterator:
    """Repeat an iterable of batches (a DataLoader) for as many steps as asked."""
    while True:
        yield from batches


def quantized_distillation(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[tuple[Any, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    config: DistillConfig = DistillConfig(),
    forward: Forward = _default_forward,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    loss_fn: LossFn | None = None,
) -> list[dict[str, float]]:
    """Run Algorithm 1 for ``steps`` steps over ``(inputs, target)`` batches (repeated as
    needed) and return the per-step history (``loss``, ``distillation``); ``on_step(step,
    record)`` can log progress or save checkpoints. A batch ``(inputs, target,
    teacher_logits)`` brings the teacher's logits with it, and the teacher does not run on it.
    Call :func:`finish_` afterwards to quantize the student once more and keep only the
    quantized weights."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if teacher is not None:
        freeze_(teacher)
    history = []
    for step, (inputs, target, *ahead) in zip(range(steps), cycle(batches)):
        source = ahead[0] if ahead else teacher
        record = distill_step(student, source, inputs, target, optimizer, config, forward, loss_fn)
        if scheduler is not None:
            scheduler.step()
        history.append(record)
        if on_step is not None:
            on_step(step, record)
    return history
