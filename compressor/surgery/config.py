"""`QuantConfig`: which weights of a model to quantize, and how."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from compressor.quantization.grids import KERNEL_GROUP_SIZES, MAX_BITS, ROUNDINGS, check_bits

METHODS = ("uniform", "nonuniform", "differentiable", "lsq")
POINT_INITS = ("quantile", "uniform")
GRIDS = ("minmax", "int4_kernel")


def _frozen_mapping(value: Mapping | None) -> Mapping:
    return MappingProxyType(dict(value or {}))


def _check_regexes(name: str, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{name}: {pattern!r} is not a valid regex ({exc})") from None


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`compressor.quantize_` quantizes a model's weights.

    Args:
        bits: bits per weight, 1 to 8 (2**bits levels or points per bucket).
        bucket_size: consecutive weights sharing one min/max scaling (None: one per tensor).
        method: "uniform" (evenly spaced levels), "nonuniform" (fixed points at quantiles or
            evenly spaced), "differentiable" (points learned by gradient descent) or "lsq"
            (a learned step per tensor, as in QKD; ``bucket_size`` does not apply).
        rounding: "nearest" or "stochastic" (unbiased; uniform method only).
        include: regexes over module names (``re.search``); None selects every module.
            Each regex must match at least one quantizable module.
        exclude: regexes over module names to leave in full precision.
        keep_first_last: leave the first and the last quantizable layer in full precision.
        bits_overrides: regex over module names -> bits, first match wins.
        num_points: tensor name (``"layer.weight"``) -> point count for the non-uniform methods,
            as returned by :func:`compressor.allocate_bits`; need not be a power of two.
        point_init: "quantile" (default) or "uniform" initial points for the non-uniform methods.
        act_bits: bits of the learned activation quantizers inserted at the inputs of quantized
            layers (QKD); None leaves activations in full precision.
        grid: "minmax" (default: offset and a 16-significant-bit scale per bucket) or
            "int4_kernel": the grid PyTorch's int4 matmul kernel multiplies with (a bf16 scale
            and zero per bucket, values ``(code - 8) * scale + zero``), so that the trained
            model runs on that kernel exactly as it was evaluated
            (:func:`compressor.to_int4_runtime_`). Needs ``bits=4``, ``method="uniform"`` and
            a ``bucket_size`` of 32, 64, 128 or 256 (the kernel's group sizes). It applies to
            2-D weights whose second (input) dimension is a multiple of ``bucket_size``; other
            weights, and modules that ``bits_overrides`` gives other than 4 bits, take the
            min-max grid (``size_report`` says which).
    """

    bits: int = 4
    bucket_size: int | None = 256
    method: str = "uniform"
    rounding: str = "nearest"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = False
    bits_overrides: Mapping[str, int] = field(default_factory=dict)
    num_points: Mapping[str, int] = field(default_factory=dict)
    point_init: str = "quantile"
    act_bits: int | None = None
    grid: str = "minmax"

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")
        if self.bucket_size is not None and (
            isinstance(self.bucket_size, bool)
            or not isinstance(self.bucket_size, int)
            or self.bucket_size <= 0
        ):
            raise ValueError(
                f"bucket_size must be a positive integer or None, got {self.bucket_size!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding == "stochastic" and self.method != "uniform":
            raise ValueError(
                f"rounding='stochastic' needs method='uniform', got method={self.method!r}"
            )
        if self.point_init not in POINT_INITS:
            raise ValueError(f"point_init must be one of {POINT_INITS}, got {self.point_init!r}")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise ValueError("include and exclude take a tuple of regexes, not a single string")
        object.__setattr__(self, "include", None if self.include is None else tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _check_regexes("include", self.include or ())
        _check_regexes("exclude", self.exclude)
        _check_regexes("bits_overrides", tuple(self.bits_overrides))
        for pattern, bits in self.bits_overrides.items():
            check_bits(bits, f"bits_overrides[{pattern!r}]")
        for name, count in self.num_points.items():
            if (
                isinstance(count, bool)
                or not isinstance(count, int)
                or not 1 <= count <= 2**MAX_BITS
            ):
                limit = 2**MAX_BITS
                raise ValueError(
                    f"num_points[{name!r}] must be an integer from 1 to {limit}, got {count!r}"
                )
        if self.num_points and self.method in ("uniform", "lsq"):
            raise ValueError("num_points needs method='nonuniform' or 'differentiable'")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "int4_kernel":
            if self.bits != 4 or self.method != "uniform":
                raise ValueError(
                    f"grid='int4_kernel' needs bits=4 and method='uniform', got bits={self.bits} "
                    f"and method={self.method!r}"
                )
            if self.bucket_size not in KERNEL_GROUP_SIZES:
                raise ValueError(
                    f"grid='int4_kernel' needs bucket_size in {KERNEL_GROUP_SIZES} (the int4 "
                    f"kernel's group sizes), got {self.bucket_size!r}"
                )
        object.__setattr__(self, "bits_overrides", _frozen_mapping(self.bits_overrides))
        object.__setattr__(self, "num_points", _frozen_mapping(self.num_points))

    def bits_for(self, module_name: str) -> int:
        """Bits for the module of that name (the first matching override, else ``bits``)."""
        for pattern, bits in self.bits_overrides.items():
            if re.search(pattern, module_name):
                return bits
        return self.bits

    def __hash__(self) -> int:
        return hash(
            (
                self.bits,
                self.bucket_size,
                self.method,
                self.rounding,
                self.include,
                self.exclude,
                self.keep_first_last,
                tuple(self.bits_overrides.items()),
                tuple(self.num_points.items()),
                self.point_init,
                self.act_bits,
                self.grid,
            )
        )
