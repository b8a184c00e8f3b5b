"""Size report: what each quantized tensor costs in theory, against fp32."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compressor.quantization.record import INT4_KERNEL, QuantSpec
from compressor.surgery.quantize import quantization_specs

# Where a weight runs after compressor.to_int4_runtime_ (compressor.runtime.int4 decides the
# same): these module types multiply on the int4 kernel, embeddings look rows up from codes.
_KERNEL_MODULES = (nn.Linear, nn.LSTM, nn.LSTMCell)


@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]
    numel: int
    bits: int | None  # None: kept in full precision
    buckets: int
    bytes: float  # theoretical: b bits per weight + two fp32 per bucket (+ points)
    fp32_bytes: int
    # "int4 kernel" (on the kernel grid, in a Linear/LSTM/LSTMCell: runs on the int4 kernel
    # after compressor.to_int4_runtime_), "codes lookup" (an embedding's rows), "fp32": decoded
    runs_on: str = "fp32"


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
            f"  {'runs on':<12}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            bits = "fp32" if r.bits is None else str(r.bits)
            lines.append(
                f"{r.name[:48]:<48} {str(tuple(r.shape)):>18} {bits:>5} {r.buckets:>8} "
                f"{r.bytes:>12,.0f} {r.fp32_bytes:>12,}  {r.runs_on:<12}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<48} {'':>18} {'':>5} {'':>8} {self.total_bytes:>12,.0f} "
            f"{self.fp32_bytes:>12,}   compression {self.compression:.2f}x"
        )
        return "\n".join(lines)


def _runs_on(model: nn.Module, name: str, spec: QuantSpec, shape: tuple[int, ...]) -> str:
    from torch.nn.utils import parametrize

    module_name = name.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return "fp32"
    kind = parametrize.type_before_parametrizations(module)
    if kind is nn.Embedding:
        whole = spec.method in ("uniform", INT4_KERNEL) and spec.bucket_size is not None
        return (
            "codes lookup"
            if whole and len(shape) == 2 and shape[1] % spec.bucket_size == 0
            else "fp32"
        )
    if kind in _KERNEL_MODULES and spec.runs_on_int4_kernel(shape):
        if kind is nn.LSTMCell:  # both of a cell's weights, or neither
            specs = quantization_specs(model)
            other = [specs.get(f"{module_name}.weight_{k}") for k in ("ih", "hh")]
            if not all(s is not None and s.method == INT4_KERNEL for s in other):
                return "fp32"
        return "int4 kernel"
    return "fp32"


def size_report(model: nn.Module) -> SizeReport:
    """Theoretical size of every parameter and buffer of ``model``: quantized weights at
    b bits per weight plus the two numbers of each bucket (two fp32; two bf16 on the int4
    kernel grid), everything else at 4 bytes per value. ``runs_on`` says where each weight
    runs once the model is put on the int4 runtime (:func:`compressor.to_int4_runtime_`)."""
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
                    _runs_on(model, name, spec, tuple(tensor.shape)),
                )
            )
    return SizeReport(tuple(rows))
