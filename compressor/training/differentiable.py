"""Differentiable quantization (Polino et al. 2018, Algorithm 2): learn the points.

Each quantized tensor owns its points on the scaled axis [0, 1] as a parameter. A weight maps
to its nearest point; the loss gradient with respect to point ``p_j`` is the sum, over the
weights assigned to it, of their bucket's scale times the gradient at the quantized weight.
After every optimizer step the points are put back in order and inside [0, 1].
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compressor.surgery.quantize import materialize_, shadow_state_dict
from compressor.surgery.quantizers import DifferentiableQuantizer
from compressor.training.quantized_distillation import quantized_distillation
from compressor.training.step import DistillConfig


def point_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable points of every differentiable quantizer of ``model``."""
    return [m.points for m in model.modules() if isinstance(m, DifferentiableQuantizer)]


@torch.no_grad()
def constrain_points_(model: nn.Module) -> None:
    """Sort every quantizer's points and clip them to [0, 1] (after each optimizer step)."""
    for p in point_parameters(model):
        p.copy_(torch.sort(p.clamp(0.0, 1.0)).values)


def keep_points_constrained(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Re-sort and clip the points after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: constrain_points_(model))


def freeze_shadow_weights_(model: nn.Module) -> None:
    """Stop gradients to the full-precision weights, so that only points (and whatever else
    stays trainable) learn."""
    for name, p in model.named_parameters():
        if name.endswith(".original"):
            p.requires_grad_(False)


def _independent_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parametrized modules have classes of their own: ``deepcopy`` shares
    torch's generated ``Parametrized*`` classes, so removing a parametrization from the copy
    would otherwise delete the property from the original's class too."""
    from torch.nn.utils import parametrize

    replica = copy.deepcopy(model)
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = module.__class__
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, own)
    return replica


def differentiable_quantization(
    student: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    steps: int,
    teacher: nn.Module | None = None,
    lr: float = 1e-5,
    temperature: float = 1.0,
    alpha: float = 0.7,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Algorithm 2: with the weights fixed, learn the points of a student quantized with
    ``QuantConfig(method="differentiable")`` by SGD on the distillation loss.

    The distillation signal comes from ``teacher``, or, if none is given, from a frozen copy
    of the student's own full-precision model (its shadow weights, unquantized).

    ``lr`` is small because a point's gradient sums over every weight it stands for, so it
    grows with the tensor: at 1e-3 the points of a 3-block CNN's 74k- and 295k-weight convs
    ran into one end of [0, 1] within 300 steps and merged, leaving the layer constant per
    bucket. 1e-5 is what the paper's reference code used for its CIFAR-10 CNNs.
    """
    if not point_parameters(student):
        raise ValueError(
            "the student has no learnable points: quantize it with method='differentiable'"
        )
    if teacher is None:
        teacher = _independent_copy(student)
        full_precision = shadow_state_dict(teacher)
        materialize_(teacher)
        teacher.load_state_dict(full_precision)
    freeze_shadow_weights_(student)
    optimizer = torch.optim.SGD(point_parameters(student), lr=lr, momentum=0.9, nesterov=True)
    handle = keep_points_constrained(optimizer, student)
    try:
        return quantized_distillation(
            student,
            teacher,
            batches,
            optimizer,
            steps,
            DistillConfig(temperature, alpha),
            **({} if forward is None else {"forward": forward}),
        )
    finally:
        handle.remove()
