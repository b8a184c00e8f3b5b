"""Weight-quantization parametrizations (``torch.nn.utils.parametrize``).

Each quantizer is a small module whose forward maps the full-precision shadow weight to its
quantized value; the gradient passes straight through to the shadow weight. ``quantize_``
registers them, ``materialize_`` removes them and leaves the quantized values.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from compressor.quantizers import (
    BucketCodes,
    quantile_points,
    quantize_tensor,
    round_points,
    uniform_points,
)
from compressor.spec import QuantSpec, code_bits


class _StraightThrough(torch.autograd.Function):
    """Forward: ``quantize(w)``; backward: identity. Exact on the grid, unlike
    ``w + (q - w).detach()`` which leaves values an ulp off."""

    @staticmethod
    def forward(ctx, weight, quantize):  # noqa: ANN001
        return quantize(weight)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001
        return grad_output, None


class WeightQuantizer(nn.Module, abc.ABC):
    """Base class: ``forward`` quantizes the shadow weight, ``spec`` says how to store it."""

    bucket_size: int | None

    @property
    @abc.abstractmethod
    def spec(self) -> QuantSpec:
        """How the current quantized weight is stored."""

    def encode(self, weight: torch.Tensor) -> BucketCodes:
        """The codes the quantized weight is stored as (see :class:`QuantSpec`), from the
        full-precision shadow weight."""
        return self.spec.encode(weight.detach())


class UniformQuantizer(WeightQuantizer):
    """Bucketed min-max uniform quantization with ``2**bits`` levels."""

    def __init__(self, bits: int, bucket_size: int | None = 256, rounding: str = "nearest"):
        super().__init__()
        self.bits = bits
        self.bucket_size = bucket_size
        self.rounding = rounding
        self._spec = QuantSpec("uniform", bits, bucket_size)

    @property
    def spec(self) -> QuantSpec:
        return self._spec

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        # Stochastic rounding is a training-time device; evaluation always rounds to nearest.
        rounding = self.rounding if self.training else "nearest"
        return quantize_tensor(weight, self.bits, self.bucket_size, rounding)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self._quantize)

    def encode(self, weight: torch.Tensor) -> BucketCodes:
        # Encode the value the model computes with (re-quantizing it is exact), whichever
        # kernel produced it.
        with torch.no_grad():
            value = quantize_tensor(weight.detach(), self.bits, self.bucket_size, "nearest")
        return self.spec.encode(value)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bucket_size={self.bucket_size}, rounding={self.rounding}"


class NonUniformQuantizer(WeightQuantizer):
    """Quantization to fixed points on the scaled axis [0, 1] (a buffer, saved with the model)."""

    def __init__(self, points: torch.Tensor, bucket_size: int | None = 256):
        super().__init__()
        self.bucket_size = bucket_size
        self.register_buffer("points", round_points(points))

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.nonuniform(self.points, self.bucket_size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        return _StraightThrough.apply(weight, spec.quantize)

    def extra_repr(self) -> str:
        return f"points={self.points.numel()}, bucket_size={self.bucket_size}"


def initial_points(
    weight: torch.Tensor, num_points: int, bucket_size: int | None, init: str
) -> torch.Tensor:
    """Starting points for the non-uniform methods: quantiles of the scaled weights, or even."""
    if init == "quantile":
        return quantile_points(weight, num_points, bucket_size)
    return uniform_points(num_points)


def make_weight_quantizer(
    method: str,
    weight: torch.Tensor,
    bits: int,
    bucket_size: int | None,
    rounding: str = "nearest",
    num_points: int | None = None,
    point_init: str = "quantile",
) -> WeightQuantizer:
    """The quantizer module for one weight tensor, as :class:`QuantConfig` describes it."""
    if method == "uniform":
        return UniformQuantizer(bits, bucket_size, rounding)
    if method == "lsq":
        from compressor.lsq import LsqWeightQuantizer

        return LsqWeightQuantizer(weight, bits)
    count = num_points if num_points is not None else 2**bits
    points = initial_points(weight.detach(), count, bucket_size, point_init)
    if method == "nonuniform":
        return NonUniformQuantizer(points, bucket_size)
    if method == "differentiable":
        from compressor.differentiable import DifferentiableQuantizer

        return DifferentiableQuantizer(points, bucket_size)
    raise ValueError(f"unknown method {method!r}")


__all__ = [
    "WeightQuantizer",
    "UniformQuantizer",
    "NonUniformQuantizer",
    "make_weight_quantizer",
    "initial_points",
    "code_bits",
]
