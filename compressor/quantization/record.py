"""The quantization record: :class:`QuantSpec`, how one stored tensor was quantized (enough
to encode and decode it), and :class:`QuantRecord`, the specs (and known codes) of a model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from compressor.quantization.grids import (
    KERNEL_GROUP_SIZES,
    BucketCodes,
    check_bits,
    decode_int4_kernel,
    decode_nonuniform,
    decode_uniform,
    encode_int4_kernel,
    encode_nonuniform,
    encode_uniform,
    kernel_grid_fits,
    quantize_int4_kernel,
    quantize_nonuniform,
    quantize_tensor,
    round_points,
)

INT4_KERNEL = "int4_kernel"
SPEC_METHODS = ("uniform", "nonuniform", INT4_KERNEL)


def code_bits(num_points: int) -> int:
    """Bits needed to index ``num_points`` points (at least one)."""
    return max(1, math.ceil(math.log2(num_points)))


@dataclass(frozen=True)
class QuantSpec:
    """One tensor's quantization: ``method`` "uniform" (2**bits levels), "nonuniform"
    (``points`` on [0, 1], indexed with ``bits`` bits) or "int4_kernel" (4 bits on the int4
    kernel's grid: a bf16 scale and zero per bucket, values ``(code - 8) * scale + zero``),
    bucketed by ``bucket_size``."""

    method: str
    bits: int
    bucket_size: int | None = 256
    points: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"method must be one of {SPEC_METHODS}, got {self.method!r}")
        check_bits(self.bits)
        if self.bucket_size is not None and self.bucket_size <= 0:
            raise ValueError(f"bucket_size must be positive or None, got {self.bucket_size!r}")
        if self.method == "nonuniform":
            if not self.points or len(self.points) > 2**self.bits:
                raise ValueError(
                    f"a nonuniform spec needs 1 to 2**bits={2**self.bits} points, "
                    f"got {0 if not self.points else len(self.points)}"
                )
        elif self.points is not None:
            raise ValueError(f"a {self.method} spec takes no points")
        if self.method == INT4_KERNEL and (
            self.bits != 4 or self.bucket_size not in KERNEL_GROUP_SIZES
        ):
            raise ValueError(
                f"an int4_kernel spec has 4 bits and a bucket size in {KERNEL_GROUP_SIZES}, "
                f"got {self.bits} bits and bucket size {self.bucket_size!r}"
            )

    @classmethod
    def nonuniform(cls, points: torch.Tensor, bucket_size: int | None = 256) -> QuantSpec:
        """A non-uniform spec from a tensor of points (rounded as they are stored)."""
        stored = round_points(points)
        return cls("nonuniform", code_bits(stored.numel()), bucket_size, tuple(stored.tolist()))

    @property
    def points_tensor(self) -> torch.Tensor:
        return torch.tensor(self.points, dtype=torch.float32)

    @property
    def num_levels(self) -> int:
        return 2**self.bits if self.points is None else len(self.points)

    @property
    def reencodes(self) -> bool:
        """Whether quantized values alone give back their codes (``encode`` of a quantized
        tensor decodes to it). Min-max uniform grids do; learned points and the int4 kernel
        grid (whose bf16 scale and zero a quantized bucket does not determine) need the codes
        encoded from the full-precision weights, which records keep."""
        return self.method == "uniform"

    def runs_on_int4_kernel(self, shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether a tensor of this shape and spec can be multiplied by the int4 kernel."""
        return self.method == INT4_KERNEL and kernel_grid_fits(shape, self.bucket_size)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "uniform":
            return quantize_tensor(x, self.bits, self.bucket_size)
        if self.method == INT4_KERNEL:
            return quantize_int4_kernel(x, self.bucket_size)
        return quantize_nonuniform(x, self.points_tensor, self.bucket_size)

    def encode(self, x: torch.Tensor) -> BucketCodes:
        if self.method == "uniform":
            return encode_uniform(x, self.bits, self.bucket_size)
        if self.method == INT4_KERNEL:
            return encode_int4_kernel(x, self.bucket_size)
        return encode_nonuniform(x, self.points_tensor, self.bucket_size)

    def decode(
        self,
        encoded: BucketCodes,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if self.method == "uniform":
            return decode_uniform(encoded, shape, self.bucket_size, dtype)
        if self.method == INT4_KERNEL:
            return decode_int4_kernel(encoded, shape, self.bucket_size, dtype)
        return decode_nonuniform(encoded, self.points_tensor, shape, self.bucket_size, dtype)

    def num_buckets(self, numel: int) -> int:
        if numel == 0:
            return 0
        d = numel if self.bucket_size is None else self.bucket_size
        return -(-numel // d)

    @property
    def bucket_bytes(self) -> int:
        """Bytes stored per bucket: two fp32 (offset, scale), or two bf16 (zero, scale)."""
        return 4 if self.method == INT4_KERNEL else 8

    def theoretical_bytes(self, numel: int) -> float:
        """b bits per weight plus the two numbers of each bucket (plus the points, if any)."""
        points = 0 if self.points is None else 4 * len(self.points)
        return numel * self.bits / 8 + self.bucket_bytes * self.num_buckets(numel) + points

    def to_dict(self) -> dict:
        out = {"method": self.method, "bits": self.bits, "bucket_size": self.bucket_size}
        if self.points is not None:
            out["points"] = list(self.points)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        points = data.get("points")
        return cls(
            method=data["method"],
            bits=int(data["bits"]),
            bucket_size=None if data.get("bucket_size") is None else int(data["bucket_size"]),
            points=None if points is None else tuple(float(p) for p in points),
        )


RECORD_VERSION = 1


@dataclass(frozen=True)
class QuantRecord:
    """How each tensor of a model was quantized, by plain name (``"fc.weight"``): the one
    record that :func:`compressor.quantize_` and :func:`compressor.materialize_` produce,
    training checkpoints of both plugins carry (:meth:`to_dict`, under ``"qdistill"``), and
    :func:`compressor.save_packed` stores.

    ``codes`` holds the codes of tensors whose values do not re-encode to themselves (learned
    points, LSQ steps), when they are known; min-max uniform values re-encode exactly."""

    specs: Mapping[str, QuantSpec] = field(default_factory=dict)
    codes: Mapping[str, BucketCodes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.codes) - set(self.specs))
        if unknown:
            raise ValueError(f"codes for tensors without a spec: {unknown[:5]}")

    def __bool__(self) -> bool:
        return bool(self.specs)

    def merged(self, other: QuantRecord) -> QuantRecord:
        return QuantRecord({**self.specs, **other.specs}, {**self.codes, **other.codes})

    def to_dict(self) -> dict:
        """Plain data (str, int, float, lists, tensors) that ``torch.load(weights_only=True)``
        and JSON (without ``codes``) both take."""
        return {
            "version": RECORD_VERSION,
            "specs": {name: spec.to_dict() for name, spec in self.specs.items()},
            "codes": {name: dict(c._asdict()) for name, c in self.codes.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> QuantRecord:
        """The inverse of :meth:`to_dict`; also reads the ``{"specs": ..., "format": 1}``
        dicts that checkpoints written before the record carried. Raises ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a quantization record is a dict, got {type(data).__name__}")
        version = data.get("version", 1)  # records written before the version field
        if version != RECORD_VERSION:
            raise ValueError(
                f"quantization record version {version!r} is not supported (this qdistill "
                f"reads version {RECORD_VERSION}); upgrade qdistill"
            )
        specs_data, codes_data = data.get("specs") or {}, data.get("codes") or {}
        if not isinstance(specs_data, Mapping) or not isinstance(codes_data, Mapping):
            raise ValueError("a quantization record's specs and codes are dicts by tensor name")
        try:
            specs = {str(n): QuantSpec.from_dict(s) for n, s in specs_data.items()}
            codes = {str(n): BucketCodes(**c) for n, c in codes_data.items()}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a quantization record entry is malformed ({exc})") from None
        return cls(specs, codes)
