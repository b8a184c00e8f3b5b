"""Weight-quantization parametrizations (``torch.nn.utils.parametrize``).

Each quantizer is a small module whose forward maps the full-precision shadow weight to its
quantized value; the gradient passes straight through to the shadow weight. ``quantize_``
registers them, ``materialize_`` removes them and leaves the quantized values.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from compressor.quantization.grids import (
    BucketCodes,
    _nearest_point,
    _scaled,
    bucket_view,
    check_bits,
    kernel_grid_fits,
    quantile_points,
    quantize_int4_kernel,
    quantize_tensor,
    round_points,
    uniform_points,
)
from compressor.quantization.lsq import _short_step, lsq_levels, lsq_quantize
from compressor.quantization.record import QuantSpec, code_bits


class _StraightThrough(torch.autograd.Function):
    """Forward: ``quantize(w)``; backward: identity. Exact on the grid, unlike
    ``w + (q - w).detach()`` which leaves values an ulp off."""

    @staticmethod
    def forward(ctx, weight, quantize):
        return quantize(weight)

    @staticmethod
    def backward(ctx, grad_output):
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


class Int4KernelQuantizer(WeightQuantizer):
    """4-bit quantization on the int4 kernel's grid (see
    :func:`compressor.quantization.grids.quantize_int4_kernel`): per bucket, a bf16 scale and
    zero from the bucket's minimum and maximum. Its codes are encoded from the shadow weight
    (the quantized values alone do not give back the bf16 pair), and records keep them."""

    def __init__(self, bucket_size: int = 256, rounding: str = "nearest"):
        super().__init__()
        self.bits = 4
        self.bucket_size = bucket_size
        self.rounding = rounding
        self._spec = QuantSpec("int4_kernel", 4, bucket_size)

    @property
    def spec(self) -> QuantSpec:
        return self._spec

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        # Stochastic rounding is a training-time device; evaluation always rounds to nearest.
        rounding = self.rounding if self.training else "nearest"
        return quantize_int4_kernel(weight, self.bucket_size, rounding)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self._quantize)

    def extra_repr(self) -> str:
        return f"int4 kernel grid, bucket_size={self.bucket_size}, rounding={self.rounding}"


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


class _LearnedPoints(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, points, bucket_size):
        stored, order = torch.sort(points.detach().clamp(0.0, 1.0))
        stored = round_points(stored)
        lo, scale, unit = _scaled(bucket_view(weight.detach(), bucket_size))
        codes = _nearest_point(unit, stored)
        values = stored[codes].mul_(scale).add_(lo)
        numel = weight.numel()
        ctx.save_for_backward(codes, scale, order)
        ctx.numel = numel
        ctx.num_points = points.numel()
        return values.reshape(-1)[:numel].view(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        codes, scale, order = ctx.saved_tensors
        grad_rows = torch.zeros(codes.shape, dtype=torch.float32, device=grad_output.device)
        grad_rows.view(-1)[: ctx.numel] = grad_output.reshape(-1).float()
        weighted = (grad_rows * scale).reshape(-1)  # padding in the last bucket adds zero
        grad_sorted = torch.zeros(ctx.num_points, dtype=torch.float32, device=weighted.device)
        grad_sorted.index_add_(0, codes.reshape(-1), weighted)
        grad_points = torch.empty_like(grad_sorted)
        grad_points[order] = grad_sorted
        return grad_output, grad_points, None


class DifferentiableQuantizer(WeightQuantizer):
    """Non-uniform quantization whose points are learned by gradient descent."""

    def __init__(self, points: torch.Tensor, bucket_size: int | None = 256):
        super().__init__()
        self.bucket_size = bucket_size
        self.points = nn.Parameter(round_points(points).clone())

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.nonuniform(self.points.detach().clamp(0.0, 1.0), self.bucket_size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _LearnedPoints.apply(weight, self.points, self.bucket_size)

    def extra_repr(self) -> str:
        return f"points={self.points.numel()}, bucket_size={self.bucket_size}"


class LsqActivationQuantizer(nn.Module):
    """Quantizes a layer's input to ``bits`` with a learned step. The step and whether the
    input is signed (anything below zero) are set from the first batch seen."""

    def __init__(self, bits: int):
        super().__init__()
        check_bits(bits, "act_bits")
        self.bits = bits
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        self.signed.fill_(bool(x.min() < 0))
        _, qp = lsq_levels(self.bits, bool(self.signed))
        self.step.fill_(max(2 * float(x.abs().mean()) / math.sqrt(max(qp, 1)), 1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._initialize(x)
        qn, qp = lsq_levels(self.bits, bool(self.signed))
        return lsq_quantize(x, self.step, qn, qp, 1.0 / math.sqrt(x.numel() * max(qp, 1)))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LsqWeightQuantizer(WeightQuantizer):
    """Weights quantized to ``k * step`` for integer ``k`` in ``[-2^(b-1), 2^(b-1) - 1]``,
    with the step learned (one per tensor)."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        check_bits(bits, "bits of method='lsq'", minimum=2)
        self.bits = bits
        self.bucket_size = None
        qn, qp = lsq_levels(bits, signed=True)
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
    grid: str = "minmax",
) -> WeightQuantizer:
    """The quantizer module for one weight tensor, as :class:`QuantConfig` describes it
    (``grid="int4_kernel"`` applies to 4-bit uniform weights whose shape the kernel takes;
    others get the min-max grid)."""
    if (
        grid == "int4_kernel"
        and method == "uniform"
        and bits == 4
        and kernel_grid_fits(weight.shape, bucket_size)
    ):
        return Int4KernelQuantizer(bucket_size, rounding)
    if method == "uniform":
        return UniformQuantizer(bits, bucket_size, rounding)
    if method == "lsq":
        return LsqWeightQuantizer(weight, bits)
    count = num_points if num_points is not None else 2**bits
    points = initial_points(weight.detach(), count, bucket_size, point_init)
    if method == "nonuniform":
        return NonUniformQuantizer(points, bucket_size)
    if method == "differentiable":
        return DifferentiableQuantizer(points, bucket_size)
    raise ValueError(f"unknown method {method!r}")


__all__ = [
    "WeightQuantizer",
    "UniformQuantizer",
    "Int4KernelQuantizer",
    "NonUniformQuantizer",
    "DifferentiableQuantizer",
    "LsqWeightQuantizer",
    "LsqActivationQuantizer",
    "make_weight_quantizer",
    "initial_points",
    "code_bits",
]
