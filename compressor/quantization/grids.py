"""Bucketed min-max quantizers (Polino et al. 2018, section 2.1), exact to the bit.

Every quantized tensor is cut into buckets of ``bucket_size`` consecutive weights. A bucket is
stored as integer codes plus two fp32 numbers, ``offset`` (the bucket minimum) and ``scale``, and
decodes as ``offset + code * scale`` (uniform) or ``offset + points[code] * scale``
(non-uniform, where ``scale`` is the bucket range max - min).

The decode is designed to give the same bits on every path (eager, ``torch.compile``, the
packed-file loader), whether or not a compiler fuses the multiply-add: ``scale`` keeps at most
16 significant bits (uniform) or 12 (non-uniform, with points of 12 bits too), so the product
``code * scale`` is exact in fp32 and only the final addition rounds. Quantizing an already
quantized tensor therefore gives it back unchanged, which is what lets a materialized
checkpoint be packed and unpacked bit for bit.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

__all__ = [
    "MAX_BITS",
    "check_bits",
    "ROUNDINGS",
    "BucketCodes",
    "quantize_tensor",
    "encode_uniform",
    "decode_uniform",
    "quantize_nonuniform",
    "encode_nonuniform",
    "decode_nonuniform",
    "quantile_points",
    "uniform_points",
    "round_points",
    "bucket_view",
    "KERNEL_GROUP_SIZES",
    "kernel_grid_fits",
    "quantize_int4_kernel",
    "encode_int4_kernel",
    "decode_int4_kernel",
]

MAX_BITS = 8
ROUNDINGS = ("nearest", "stochastic")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BucketCodes(NamedTuple):
    """What a quantized tensor is stored as: one code per weight and two fp32 per bucket."""

    codes: torch.Tensor  # uint8, flat, numel of the tensor
    offset: torch.Tensor  # fp32, one per bucket
    scale: torch.Tensor  # fp32, one per bucket


def check_bits(bits: object, name: str = "bits", minimum: int = 1) -> None:
    """The one bits check: ``bits`` is an integer from ``minimum`` to :data:`MAX_BITS`;
    raises ``ValueError`` naming the setting (``name``) otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not minimum <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be from {minimum} to {MAX_BITS} (a whole number), got {bits!r}"
        )


def _check_bucket_size(bucket_size: int | None) -> None:
    if bucket_size is None:
        return
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size <= 0:
        raise ValueError(
            f"bucket_size must be a positive integer or None (one bucket per tensor), "
            f"got {bucket_size!r}"
        )


def _check_float(x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantization needs a floating-point tensor, got dtype {x.dtype}")


def bucket_view(x: torch.Tensor, bucket_size: int | None) -> torch.Tensor:
    """The tensor as fp32 rows of ``bucket_size`` (the last partial bucket padded by repeating
    its own last value, which changes neither its minimum nor its maximum)."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    d = _row_length(n, bucket_size)
    rem = n % d
    if rem:
        flat = torch.cat([flat, flat[-1:].expand(d - rem)])
    return flat.view(-1, d)


def _round_significand(v: torch.Tensor, keep_bits: int) -> torch.Tensor:
    """Round positive fp32 values to ``keep_bits`` significant bits (ties away from zero)."""
    drop = 24 - keep_bits
    as_int = v.view(torch.int32)
    rounded = (as_int + (1 << (drop - 1))) & ~((1 << drop) - 1)
    return rounded.view(torch.float32)


def _previous_short(v: torch.Tensor, keep_bits: int) -> torch.Tensor:
    """The next smaller value with ``keep_bits`` significant bits (for positive ``v``)."""
    step = 1 << (24 - keep_bits)
    return (v.view(torch.int32) - step).view(torch.float32)


def _short_scale(lo: torch.Tensor, hi: torch.Tensor, top: float, keep_bits: int) -> torch.Tensor:
    """Per-bucket scale with ``keep_bits`` significant bits such that ``lo + top*scale <= hi``.

    ``top`` is the largest multiplier of the scale (levels-1 for uniform, 1.0 for points).
    A constant bucket gets scale 0 and decodes to its value exactly.
    """
    scale = _round_significand((hi - lo) / top, keep_bits)
    over = (lo + top * scale) > hi
    scale = torch.where(over & (scale > 0), _previous_short(scale, keep_bits), scale)
    return torch.where(hi > lo, scale, torch.zeros_like(scale))


def _uniform_grid(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
    return lo, _short_scale(lo, hi, float(2**bits - 1), keep_bits=16)


def _uniform_codes(
    rows: torch.Tensor,
    lo: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Float codes in [0, 2^b - 1] for each weight (not yet cast to an integer type)."""
    return _rounded_steps(rows, lo, scale, rounding, generator).clamp_(0, 2**bits - 1)


def _rounded_steps(
    rows: torch.Tensor,
    origin: torch.Tensor,
    scale: torch.Tensor,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``(rows - origin) / scale`` rounded to whole steps (nearest or stochastic), unclamped;
    a bucket of scale 0 gives 0."""
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    steps = (rows - origin).mul_(inv)
    if rounding == "nearest":
        return steps.round_()
    noise = torch.rand(steps.shape, generator=generator, device=steps.device)
    return steps.add_(noise).floor_()


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _finish(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


# Tensors at least this large take a fused kernel compiled once per process (torch.compile):
# eager ops make ~6 passes over memory, the fused kernel one. The decode is exact whatever the
# compiler fuses (module doc), so both paths give identical values. QDISTILL_COMPILE=0 turns
# the fused path off.
FUSED_MIN_NUMEL = 1 << 22
_fused_kernel = None


def _fused_uniform(rows: torch.Tensor, levels: float) -> torch.Tensor:
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
    scale = _short_scale(lo, hi, levels, keep_bits=16)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.clamp(torch.round((rows - lo) * inv), 0, levels)
    return codes * scale + lo


def _fused_quantize(rows: torch.Tensor, bits: int) -> torch.Tensor | None:
    """The fused kernel's result, or None where it is off or cannot be compiled here."""
    global _fused_kernel
    if _fused_kernel is False or os.environ.get("QDISTILL_COMPILE", "1") == "0":
        return None
    try:
        if _fused_kernel is None:
            _fused_kernel = torch.compile(_fused_uniform, dynamic=True)
        return _fused_kernel(rows, float(2**bits - 1))
    except Exception as exc:  # no C++ compiler, unsupported device: eager is still exact
        warnings.warn(
            f"qdistill: fused quantizer unavailable ({exc}); using eager ops", stacklevel=3
        )
        _fused_kernel = False
        return None


def quantize_tensor(
    x: torch.Tensor,
    bits: int,
    bucket_size: int | None = 256,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform bucketed min-max quantization; returns de-quantized values of x's shape and dtype.

    Each bucket of ``bucket_size`` consecutive weights (``None``: the whole tensor) is mapped to
    ``2**bits`` evenly spaced levels between its minimum and maximum. ``rounding="stochastic"``
    rounds up with probability equal to the fractional part, so it is unbiased.
    """
    check_bits(bits)
    _check_bucket_size(bucket_size)
    _check_rounding(rounding)
    _check_float(x)
    if x.numel() == 0:
        return x.clone()
    rows = bucket_view(x, bucket_size)
    if (
        rounding == "nearest"
        and x.numel() >= FUSED_MIN_NUMEL
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        fused = _fused_quantize(rows, bits)
        if fused is not None:
            return _finish(fused, x)
    lo, scale = _uniform_grid(rows, bits)
    codes = _uniform_codes(rows, lo, scale, bits, rounding, generator)
    return _finish(codes.mul_(scale).add_(lo), x)


def encode_uniform(
    x: torch.Tensor,
    bits: int,
    bucket_size: int | None = 256,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> BucketCodes:
    """The codes and per-bucket offset/scale that :func:`quantize_tensor` decodes from."""
    check_bits(bits)
    _check_bucket_size(bucket_size)
    _check_rounding(rounding)
    _check_float(x)
    rows = bucket_view(x, bucket_size)
    lo, scale = _uniform_grid(rows, bits)
    codes = _uniform_codes(rows, lo, scale, bits, rounding, generator)
    flat_codes = codes.reshape(-1)[: x.numel()].to(torch.uint8)
    return BucketCodes(flat_codes, lo.reshape(-1), scale.reshape(-1))


def _row_length(numel: int, bucket_size: int | None) -> int:
    """Weights per row: a bucket larger than the tensor is one bucket of the tensor's size
    (never padded out to the declared bucket size)."""
    return max(numel if bucket_size is None else min(bucket_size, numel), 1)


def _decode_rows(codes: torch.Tensor, numel: int, bucket_size: int | None) -> torch.Tensor:
    d = _row_length(numel, bucket_size)
    rem = numel % d
    flat = codes.reshape(-1)
    if rem:
        flat = torch.cat([flat, flat.new_zeros(d - rem)])
    return flat.view(-1, d)


def decode_uniform(
    encoded: BucketCodes,
    shape: torch.Size | tuple[int, ...],
    bucket_size: int | None = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`encode_uniform`, bit-exact with :func:`quantize_tensor`."""
    numel = int(torch.Size(shape).numel())
    rows = _decode_rows(encoded.codes, numel, bucket_size).to(torch.float32)
    values = rows.mul_(encoded.scale.view(-1, 1)).add_(encoded.offset.view(-1, 1))
    return values.reshape(-1)[:numel].view(tuple(shape)).to(dtype)


# --------------------------------------------------------------------------------------------
# Non-uniform quantization: a sorted set of points on the scaled axis [0, 1].


def round_points(points: torch.Tensor) -> torch.Tensor:
    """Points as stored: sorted, inside [0, 1], with 12 significant bits (see module doc)."""
    p = points.detach().to(torch.float32).clamp(0.0, 1.0)
    p = torch.where(p > 0, _round_significand(p, 12), p).clamp_(0.0, 1.0)
    return torch.sort(p).values


def _check_points(points: torch.Tensor) -> None:
    if points.dim() != 1 or not 1 <= points.numel() <= 2**MAX_BITS:
        raise ValueError(
            f"points must be a 1-D tensor of 1 to {2**MAX_BITS} values, got shape "
            f"{tuple(points.shape)}"
        )


def uniform_points(num_points: int) -> torch.Tensor:
    """``num_points`` evenly spaced points on [0, 1]."""
    if num_points < 1 or num_points > 2**MAX_BITS:
        raise ValueError(f"num_points must be from 1 to {2**MAX_BITS}, got {num_points}")
    if num_points == 1:
        return torch.zeros(1)
    return round_points(torch.linspace(0.0, 1.0, num_points))


def _scaled(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
    scale = _short_scale(lo, hi, 1.0, keep_bits=12)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return lo, scale, (rows - lo).mul_(inv).clamp_(0.0, 1.0)


def quantile_points(
    x: torch.Tensor, num_points: int, bucket_size: int | None = 256
) -> torch.Tensor:
    """Points at the quantiles of x's scaled values (the paper's initialisation)."""
    if num_points < 1 or num_points > 2**MAX_BITS:
        raise ValueError(f"num_points must be from 1 to {2**MAX_BITS}, got {num_points}")
    _, _, unit = _scaled(bucket_view(x.detach(), bucket_size))
    unit = unit.reshape(-1)
    if unit.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample suffices
        unit = unit[:: unit.numel() // 1_000_000 + 1]
    probs = torch.linspace(0.0, 1.0, num_points) if num_points > 1 else torch.tensor([0.5])
    return round_points(torch.quantile(unit, probs))


def _nearest_point(unit: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index of the nearest point for every scaled value (ties go to the lower point)."""
    if points.numel() == 1:
        return torch.zeros_like(unit, dtype=torch.int64)
    midpoints = (points[1:] + points[:-1]) * 0.5
    return torch.bucketize(unit, midpoints, right=False)


def encode_nonuniform(
    x: torch.Tensor, points: torch.Tensor, bucket_size: int | None = 256
) -> BucketCodes:
    """Codes (indices into ``points``) with per-bucket offset (min) and scale (range)."""
    _check_bucket_size(bucket_size)
    _check_float(x)
    _check_points(points)
    points = round_points(points)
    lo, scale, unit = _scaled(bucket_view(x, bucket_size))
    codes = _nearest_point(unit, points).reshape(-1)[: x.numel()].to(torch.uint8)
    return BucketCodes(codes, lo.reshape(-1), scale.reshape(-1))


def decode_nonuniform(
    encoded: BucketCodes,
    points: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    bucket_size: int | None = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`encode_nonuniform`, bit-exact with :func:`quantize_nonuniform`."""
    numel = int(torch.Size(shape).numel())
    points = round_points(points)
    rows = _decode_rows(encoded.codes, numel, bucket_size).long()
    values = points[rows].mul_(encoded.scale.view(-1, 1)).add_(encoded.offset.view(-1, 1))
    return values.reshape(-1)[:numel].view(tuple(shape)).to(dtype)


def quantize_nonuniform(
    x: torch.Tensor, points: torch.Tensor, bucket_size: int | None = 256
) -> torch.Tensor:
    """Non-uniform quantization: every scaled value goes to its nearest point."""
    _check_bucket_size(bucket_size)
    _check_float(x)
    _check_points(points)
    if x.numel() == 0:
        return x.clone()
    points = round_points(points)
    lo, scale, unit = _scaled(bucket_view(x, bucket_size))
    values = points[_nearest_point(unit, points)].mul_(scale).add_(lo)
    return _finish(values, x)


# --------------------------------------------------------------------------------------------
# The int4 kernel grid: what PyTorch's int4 weight-only matmul multiplies with.
#
# ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (and ``_weight_int4pack_mm`` on CUDA) takes
# 4-bit codes in groups of ``group_size`` consecutive weights along the input dimension K of an
# [N, K] weight, with one bf16 ``scale`` and one bf16 ``zero`` per group, and multiplies with
# ``(code - 8) * scale + zero`` computed in fp32 (measured on torch 2.14.1, x86_64: an identity
# input gives that value rounded to bf16, and single-entry inputs ``a * e_k`` give
# ``bf16(a * w)`` for the fp32 ``w``, never for its bf16 rounding). ``(code - 8) * scale`` is
# exact in fp32 (4 by 8 significant bits), so only the addition rounds: the value is the same
# whether or not a multiply-add is fused. Our bucket is the kernel's group: a tensor whose last
# dimension is a multiple of the bucket size has buckets that are exactly its groups.

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_KERNEL_ATTEMPTS = 4


def kernel_grid_fits(shape: torch.Size | tuple[int, ...], bucket_size: int | None) -> bool:
    """Whether a weight of this shape can be multiplied by the int4 kernel with buckets of
    ``bucket_size``: two dimensions [N, K], K a multiple of a supported group size. (N need
    not be a multiple of what the packing op needs: the runtime pads it with empty rows.)"""
    return (
        bucket_size in KERNEL_GROUP_SIZES
        and len(shape) == 2
        and shape[0] > 0
        and shape[1] > 0
        and shape[1] % bucket_size == 0
    )


def _bf16_up(v: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 values rounded up to bf16 (8 significant bits), held in fp32."""
    return ((v.view(torch.int32) + 0xFFFF) & ~0xFFFF).view(torch.float32)


def _bf16_next_up(v: torch.Tensor) -> torch.Tensor:
    """The next larger bf16 value of non-negative bf16 values held in fp32."""
    return (v.view(torch.int32) + 0x10000).view(torch.float32)


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at the magnitude of ``v`` (fp32)."""
    exponent = (v.abs().view(torch.int32) & 0x7F800000).view(torch.float32)
    return exponent * 2.0**-7


def _bf16_nearest(v: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to the nearest bf16 (ties to even), held in fp32: integer
    arithmetic on the bits, so that no compiler can elide or reorder the rounding."""
    bits = v.view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF).view(torch.float32)


def _kernel_attempt(
    lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, attempt: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One try at each bucket's zero for the given scales: (zero, covered, next scale)."""
    zero = _bf16_nearest((lo + hi) * 0.5 + scale * 0.5)
    covered = ((zero - 8.0 * scale) <= lo) & ((zero + 7.0 * scale) >= hi)
    if attempt == 0:
        bigger = _bf16_next_up(scale)
    else:  # a bucket far from zero: leave room for a whole bf16 spacing of the zero
        room = _bf16_ulp(torch.maximum(lo.abs(), hi.abs()) + 16.0 * scale) * 2.0
        bigger = torch.maximum(_bf16_up((hi - lo + room) / 15.0), _bf16_next_up(scale))
    return zero, covered, torch.where(covered, scale, bigger)


def _kernel_grid_of(
    lo: torch.Tensor, hi: torch.Tensor, early_exit: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket bf16 (scale, zero) held in fp32, min-max driven: the grid
    ``(c - 8) * scale + zero``, c = 0..15, covers [lo, hi] and ``scale`` is the smallest bf16
    step that does (or, where no bf16 zero fits, a little larger). ``early_exit=False`` runs
    every attempt (same result, no data-dependent branch: for a compiler)."""
    scale = _bf16_up((hi - lo) / 15.0)
    for attempt in range(_KERNEL_ATTEMPTS):
        zero, covered, bigger = _kernel_attempt(lo, hi, scale, attempt)
        if attempt == _KERNEL_ATTEMPTS - 1 or (early_exit and bool(covered.all())):
            break  # rows with NaN never cover; they decode to NaN as in the min-max grid
        scale = bigger
    return scale, zero


def _kernel_codes(
    rows: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Float codes in [0, 15] (not yet cast to an integer type)."""
    return _rounded_steps(rows, zero, scale, rounding, generator).add_(8.0).clamp_(0, 15)


def _kernel_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.sub(8.0).mul_(scale).add_(zero)


def _check_kernel_bucket(bucket_size: int | None) -> None:
    if bucket_size not in KERNEL_GROUP_SIZES:
        raise ValueError(
            f"the int4 kernel grid needs a bucket size in {KERNEL_GROUP_SIZES} (the kernel's "
            f"group sizes), got {bucket_size!r}"
        )


def _fused_kernel_values(rows: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
    scale, zero = _kernel_grid_of(lo, hi, early_exit=False)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.clamp(torch.round((rows - zero) * inv) + 8.0, 0, 15)
    return (codes - 8.0) * scale + zero


_fused_kernel_grid = None


def _fused_kernel_quantize(rows: torch.Tensor) -> torch.Tensor | None:
    """The kernel grid's values through one compiled kernel (the same bits as eager: the grid
    is integer arithmetic on bits, the product is exact and only the addition rounds), or
    None where that is off or unavailable."""
    global _fused_kernel_grid
    if _fused_kernel_grid is False or os.environ.get("QDISTILL_COMPILE", "1") == "0":
        return None
    try:
        if _fused_kernel_grid is None:
            _fused_kernel_grid = torch.compile(_fused_kernel_values, dynamic=True)
        return _fused_kernel_grid(rows)
    except Exception as exc:  # no C++ compiler, unsupported device: eager is still exact
        warnings.warn(
            f"qdistill: fused quantizer unavailable ({exc}); using eager ops", stacklevel=3
        )
        _fused_kernel_grid = False
        return None


def quantize_int4_kernel(
    x: torch.Tensor,
    bucket_size: int = 256,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """4-bit quantization on the int4 kernel's grid: per bucket of ``bucket_size``
    consecutive weights, bf16 ``scale`` and ``zero`` chosen from the bucket's minimum and
    maximum, values ``(code - 8) * scale + zero`` (fp32), codes 0..15. Returns de-quantized
    values of x's shape and dtype. A bucket is one kernel group when the tensor is [N, K] with
    K a multiple of ``bucket_size`` (:func:`kernel_grid_fits`)."""
    _check_kernel_bucket(bucket_size)
    _check_rounding(rounding)
    _check_float(x)
    if x.numel() == 0:
        return x.clone()
    rows = bucket_view(x, bucket_size)
    if (
        rounding == "nearest"
        and x.numel() >= FUSED_MIN_NUMEL
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        fused = _fused_kernel_quantize(rows)
        if fused is not None:
            return _finish(fused, x)
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
    scale, zero = _kernel_grid_of(lo, hi)
    codes = _kernel_codes(rows, scale, zero, rounding, generator)
    return _finish(_kernel_values(codes, scale, zero), x)


def encode_int4_kernel(
    x: torch.Tensor,
    bucket_size: int = 256,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> BucketCodes:
    """The codes (0..15) and per-bucket ``offset`` = zero and ``scale`` (bf16 values held in
    fp32) that :func:`quantize_int4_kernel` decodes from."""
    _check_kernel_bucket(bucket_size)
    _check_rounding(rounding)
    _check_float(x)
    rows = bucket_view(x, bucket_size)
    lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
    scale, zero = _kernel_grid_of(lo, hi)
    codes = _kernel_codes(rows, scale, zero, rounding, generator)
    flat_codes = codes.reshape(-1)[: x.numel()].to(torch.uint8)
    return BucketCodes(flat_codes, zero.reshape(-1), scale.reshape(-1))


def decode_int4_kernel(
    encoded: BucketCodes,
    shape: torch.Size | tuple[int, ...],
    bucket_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`encode_int4_kernel`: ``(code - 8) * scale + zero`` in fp32, the value
    the int4 kernel multiplies with."""
    numel = int(torch.Size(shape).numel())
    rows = _decode_rows(encoded.codes, numel, bucket_size).to(torch.float32)
    values = _kernel_values(rows, encoded.scale.view(-1, 1), encoded.offset.view(-1, 1))
    return values.reshape(-1)[:numel].view(tuple(shape)).to(dtype)
