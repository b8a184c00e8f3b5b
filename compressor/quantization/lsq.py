"""Learned step size quantization (LSQ, Esser et al. 2020): the rounding and its gradients.

QKD quantizes weights and activations with quantizers whose parameters are learned. LSQ is
the choice here because it learns one number per tensor (the step), its gradient is simple and
well tested at 2-4 bits, and the quantized values ``k * step`` land on a uniform grid that the
packed format stores exactly (offset ``Qn * step``, scale ``step``).

The step's gradient is scaled by ``1 / sqrt(numel * Qp)`` as the paper prescribes, so that it
moves at a rate comparable with the weights'.
"""

from __future__ import annotations

import torch

from compressor.quantization.grids import _round_significand


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale``."""
    return (x - x * scale).detach() + x * scale


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return (x.round() - x).detach() + x


def _short_step(step: torch.Tensor) -> torch.Tensor:
    """The step with 16 significant bits (so ``code * step`` is exact), straight-through."""
    positive = step.detach().abs().clamp_min(1e-12)
    return step + (_round_significand(positive, 16) - step).detach()


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float
) -> torch.Tensor:
    """``round(clamp(x / step, qn, qp)) * step`` with LSQ's gradients for x and step."""
    s = _grad_scale(_short_step(step), grad_scale)
    return _round_pass(torch.clamp(x / s, qn, qp)) * s


def lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
