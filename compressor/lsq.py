"""Learned step size quantization (LSQ, Esser et al. 2020) for activations and weights.

QKD quantizes weights and activations with quantizers whose parameters are learned. LSQ is
the choice here because it learns one number per tensor (the step), its gradient is simple and
well tested at 2-4 bits, and the quantized values ``k * step`` land on a uniform grid that the
packed format stores exactly (offset ``Qn * step``, scale ``step``).

The step's gradient is scaled by ``1 / sqrt(numel * Qp)`` as the paper prescribes, so that it
moves at a rate comparable with the weights'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.parametrizations import WeightQuantizer
from compressor.quantizers import BucketCodes, _round_significand
from compressor.spec import QuantSpec


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


def _levels(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class LsqActivationQuantizer(nn.Module):
    """Quantizes a layer's input to ``bits`` with a learned step. The step and whether the
    input is signed (anything below zero) are set from the first batch seen."""

    def __init__(self, bits: int):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"act_bits must be an integer from 1 to 8, got {bits!r}")
        self.bits = bits
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        self.signed.fill_(bool(x.min() < 0))
        _, qp = _levels(self.bits, bool(self.signed))
        self.step.fill_(max(2 * float(x.abs().mean()) / math.sqrt(max(qp, 1)), 1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._initialize(x)
        qn, qp = _levels(self.bits, bool(self.signed))
        return lsq_quantize(x, self.step, qn, qp, 1.0 / math.sqrt(x.numel() * max(qp, 1)))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LsqWeightQuantizer(WeightQuantizer):
    """Weights quantized to ``k * step`` for integer ``k`` in ``[-2^(b-1), 2^(b-1) - 1]``,
    with the step learned (one per tensor)."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"method='lsq' needs bits from 2 to 8, got {bits!r}")
        self.bits = bits
        self.bucket_size = None
        qn, qp = _levels(bits, signed=True)
        self.qn, self.qp = qn, qp
        init = 2 * float(weight.detach().abs().mean()) / math.sqrt(self.qp)
        self.step = nn.Parameter(torch.tensor(max(init, 1e-8)))

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("uniform", self.bits, None)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(weight.numel() * self.qp)
        return lsq_quantize(weight, self.step, self.qn, self.qp, scale).to(weight.dtype)

    @torch.no_grad()
    def encode(self, weight: torch.Tensor) -> BucketCodes:
        step = _short_step(self.step.detach()).float()
        k = torch.clamp(weight.detach().float() / step, self.qn, self.qp).round()
        codes = (k - self.qn).to(torch.uint8).reshape(-1)
        offset = (self.qn * step).reshape(1)
        return BucketCodes(codes, offset, step.reshape(1))
