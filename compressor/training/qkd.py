"""QKD (Kim et al. 2019): quantization-aware knowledge distillation in three phases.

1. Self-studying: the quantized student trains on the labels alone; the teacher is untouched.
2. Co-studying: teacher and student train together; the student distils from the teacher and
   the teacher also distils from the student, which makes it quantization-friendly.
3. Tutoring: the teacher is frozen and the student distils from it.

The student is quantized with learned quantizers, e.g.
``QuantConfig(method="lsq", bits=4, act_bits=4)`` for W4A4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.training.distillation import check_distillation_settings
from compressor.training.step import DistillConfig, cycle, distill_step, freeze_

PHASES = ("self-studying", "co-studying", "tutoring")


@dataclass(frozen=True)
class QKDSchedule:
    """Steps of each phase, and the distillation settings of phases 2 and 3."""

    self_studying_steps: int
    co_studying_steps: int
    tutoring_steps: int
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        for name in ("self_studying_steps", "co_studying_steps", "tutoring_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_distillation_settings(self.temperature, self.alpha)

    def phase_of(self, step: int) -> str:
        if step < self.self_studying_steps:
            return PHASES[0]
        if step < self.self_studying_steps + self.co_studying_steps:
            return PHASES[1]
        return PHASES[2]

    @property
    def total_steps(self) -> int:
        return self.self_studying_steps + self.co_studying_steps + self.tutoring_steps


def qkd_train(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    schedule: QKDSchedule,
    student_optimizer: torch.optim.Optimizer,
    teacher_optimizer: torch.optim.Optimizer,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    label_smoothing: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> list[dict]:
    """Run the three phases over ``(inputs, target)`` batches, each step through
    :func:`distill_step`; returns the per-step history (phase, student loss, and the teacher's
    loss in co-studying). ``scheduler`` steps the student's learning rate after every step,
    across the phases, so that a comparison with one-phase training can share its schedule."""
    config = DistillConfig(schedule.temperature, schedule.alpha, label_smoothing=label_smoothing)
    history = []
    for step, (inputs, target) in zip(range(schedule.total_steps), cycle(batches)):
        phase = schedule.phase_of(step)
        if phase == "co-studying":
            for p in teacher.parameters():
                p.requires_grad_(True)
        else:
            freeze_(teacher)
        result = distill_step(
            student,
            None if phase == "self-studying" else teacher,
            inputs,
            target,
            student_optimizer,
            config,
            forward,
            teacher_optimizer=teacher_optimizer if phase == "co-studying" else None,
        )
        if scheduler is not None:
            scheduler.step()
        record = {"phase": phase, "student_loss": result["loss"]}
        if "teacher_loss" in result:
            record["teacher_loss"] = result["teacher_loss"]
        history.append(record)
        if on_step is not None:
            on_step(step, record)
    freeze_(teacher)
    return history
