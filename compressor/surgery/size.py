"""Size report: what each quantized tensor costs in theory, against fp32."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compressor.surgery.quantize import quantization_specs


@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]
    numel: int
    bits: int | None  # None: kept in full precision
    buckets: int
    bytes: float  # theoretical: b bits per weight + two fp32 per bucket (+ points)
    fp32_bytes: int


@dataclass(frozen=True)
class SizeReport:
    """Per-tensor and total sizes of a model's weights (theoretical, not a file size)."""

    rows: tuple[TensorSize, ...]
    file_bytes: int | None = field(default=None)

    @property
    def total_bytes(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def fp32_bytes(self) -> int:
        return sum(r.fp32_bytes for r in self.rows)

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.total_bytes if self.total_bytes else float("inf")

    def __str__(self) -> str:
        header = (
            f"{'tensor':<48} {'shape':>18} {'bits':>5} {'buckets':>8} {'bytes':>12} {'fp32':>12}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            bits = "fp32" if r.bits is None else str(r.bits)
            lines.append(
                f"{r.name[:48]:<48} {str(tuple(r.shape)):>18} {bits:>5} {r.buckets:>8} "
                f"{r.bytes:>12,.0f} {r.fp32_bytes:>12,}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<48} {'':>18} {'':>5} {'':>8} {self.total_bytes:>12,.0f} "
            f"{self.fp32_bytes:>12,}   compression {self.compression:.2f}x"
        )
        return "\n".join(lines)


def size_report(model: nn.Module) -> SizeReport:
    """Theoretical size of every parameter and buffer of ``model``: quantized weights at
    b bits per weight plus two fp32 per bucket, everything else at 4 bytes per value."""
    from compressor.surgery.quantize import shadow_state_dict

    specs = quantization_specs(model)
    rows = []
    for name, tensor in shadow_state_dict(model).items():
        if not tensor.is_floating_point():
            continue
        numel = tensor.numel()
        spec = specs.get(name)
        if spec is None:
            rows.append(
                TensorSize(name, tuple(tensor.shape), numel, None, 0, 4.0 * numel, 4 * numel)
            )
        else:
            rows.append(
                TensorSize(
                    name,
                    tuple(tensor.shape),
                    numel,
                    spec.bits,
                    spec.num_buckets(numel),
                    spec.theoretical_bytes(numel),
                    4 * numel,
                )
            )
    return SizeReport(tuple(rows))
