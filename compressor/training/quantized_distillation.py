"""Quantized distillation (Polino et al. 2018, Algorithm 1): :func:`distill_step` repeated
with a frozen teacher over a stream of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compressor.training.step import DistillConfig, Forward, LossFn, cycle, distill_step, freeze_


def quantized_distillation(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[tuple[Any, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    config: DistillConfig = DistillConfig(),
    forward: Forward | None = None,
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
