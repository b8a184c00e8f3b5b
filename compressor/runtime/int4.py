"""Run a model trained on the int4 kernel grid on the int4 kernel itself.

:func:`to_int4_runtime_` replaces, in place, the modules whose weights are on the kernel grid
(``QuantConfig(grid="int4_kernel")``) by modules that hold the packed 4-bit codes and the
per-group bf16 scale and zero, and call PyTorch's weight-only int4 matmul
(``torch.ops.aten._weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA):

- ``nn.Linear`` -> :class:`Int4Linear`;
- ``nn.LSTMCell`` -> :class:`Int4LSTMCell` (input and hidden projections in one kernel call on
  ``[x; h]``: OpenNMT-py's input-feeding decoder steps a stack of these per target position);
- ``nn.LSTM`` -> :class:`Int4LSTM` (the input projection of every time step in one call, then
  the hidden projection step by step; packed sequences, bidirectional and stacked layers);
- ``nn.Embedding`` -> :class:`CodedEmbedding`: rows looked up from the codes (kernel or min-max
  grid, rows of whole buckets) and decoded exactly; no dense table is kept.

The kernel multiplies with ``(code - 8) * scale + zero`` in fp32, the very value training and
:func:`compressor.materialize_` use. Its inputs are bf16: these layers cast their input to bf16
and their output back to the caller's dtype, so outputs differ from the fp32 path only by the
rounding of the activations to bf16 (and the order of summation). Everything else runs as
before. For inference: no gradients flow through these modules, and a model is converted on
the device it will run on (the packed layout differs between CPU and CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from compressor.format.packed import PackedCodes, load_packed_codes
from compressor.quantization.grids import BucketCodes, kernel_grid_fits
from compressor.quantization.record import INT4_KERNEL, QuantRecord, QuantSpec

_PAD_N = 16  # the CPU packing op takes N in multiples of 16: padded with empty rows


def int4_kernel_available(device: torch.device | str = "cpu") -> bool:
    """Whether this PyTorch has the int4 weight-only matmul for ``device`` (checked by running
    it once on a tiny matrix)."""
    device = torch.device(device)
    try:
        codes = BucketCodes(
            torch.full((16 * 32,), 9, dtype=torch.uint8), torch.zeros(16), torch.ones(16)
        )
        out = Int4Matrix(codes, (16, 32), 32, device)(torch.ones(1, 32, device=device))
        return bool(torch.all(out == 32.0))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------
# One [N, K] weight in the kernel's packed layout.


class Int4Matrix(nn.Module):
    """An [N, K] weight as the int4 kernel takes it: packed 4-bit codes and, per group of
    ``group_size`` along K, a bf16 (scale, zero) pair. ``forward(x)`` is ``x @ W.t()`` in bf16
    (x of shape [..., K], cast to bf16; the result is bf16)."""

    def __init__(
        self,
        codes: BucketCodes,
        shape: tuple[int, int],
        group_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        n, k = shape
        if not kernel_grid_fits(shape, group_size):
            raise ValueError(
                f"the int4 kernel cannot take a {tuple(shape)} weight in groups of {group_size}"
            )
        groups = k // group_size
        padded = -(-n // _PAD_N) * _PAD_N
        matrix = codes.codes.reshape(n, k).to(torch.int32)
        scale = codes.scale.reshape(n, groups).float()
        zero = codes.offset.reshape(n, groups).float()
        if padded != n:  # empty rows (code 8, scale 0, zero 0) multiply as zeros
            matrix = torch.cat([matrix, matrix.new_full((padded - n, k), 8)])
            scale = torch.cat([scale, scale.new_zeros(padded - n, groups)])
            zero = torch.cat([zero, zero.new_zeros(padded - n, groups)])
        device = torch.device(device)
        self.n, self.k, self.group_size, self.device_type = n, k, group_size, device.type
        pair = torch.stack([scale.t(), zero.t()], dim=2).to(torch.bfloat16).contiguous()
        self.register_buffer("scales_and_zeros", pair.to(device))
        self.register_buffer("packed", _pack(matrix.to(device), device))

        self._op = (
            torch.ops.aten._weight_int4pack_mm
            if device.type == "cuda"
            else torch.ops.aten._weight_int4pack_mm_for_cpu
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.t()``: the kernel on bf16 ``x`` (a plain method: the modules below call it
        directly, since at batch 1 every microsecond of call overhead shows)."""
        if x.dim() == 2:
            out = self._op(
                x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
            )
            return out if out.shape[1] == self.n else out[:, : self.n]
        lead = x.shape[:-1]
        return self.matmul(x.reshape(-1, self.k).contiguous()).reshape(*lead, self.n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The fp32 [N, K] weight the kernel multiplies with, read back through the kernel: an
        identity input gives each weight rounded to bf16, which identifies its code within its
        group's grid; the code decodes as ``(code - 8) * scale + zero``."""
        eye = torch.eye(self.k, dtype=torch.bfloat16, device=self.packed.device)
        rounded = self.forward(eye).t().float()
        pair = self.scales_and_zeros[:, : self.n].float()
        scale = pair[..., 0].t().repeat_interleave(self.group_size, 1)
        zero = pair[..., 1].t().repeat_interleave(self.group_size, 1)
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        codes = ((rounded - zero) * inv).round().add(8.0).clamp(0, 15)
        return (codes - 8.0) * scale + zero

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}, group_size={self.group_size}"


def _pack(matrix: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # written to the tinygemm layout of torch >= 2.5; untested here
        pairs = (matrix[:, ::2] << 4 | matrix[:, 1::2]).to(torch.uint8)
        k = matrix.shape[1]
        tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
        if tiles is None:
            raise ValueError(f"the CUDA int4 kernel needs K a multiple of 32, got {k}")
        return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(matrix, 1)


def _with_bias(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's bf16 output plus the bias, in the caller's dtype (one op for fp32)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if bias is None:
        return out.to(dtype)
    if dtype == bias.dtype:
        return out + bias  # bf16 + fp32 promotes: the sum is computed in fp32
    return out.to(dtype) + bias.to(dtype)


# --------------------------------------------------------------------------------------------
# Modules.


class Int4Linear(nn.Module):
    """``nn.Linear`` on the int4 kernel: bf16 activations, output in the input's dtype."""

    def __init__(self, weight: Int4Matrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.k, weight.n
        self.weight_int4 = weight
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _with_bias(x, self.weight_int4.matmul(x), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


# PyTorch orders an LSTM's gate rows i, f, g, o; the runtime keeps them as i, f, o, g so that
# the three sigmoids are one call on a contiguous slice (a permutation of rows: exact).
_GATE_ORDER = (0, 1, 3, 2)


def _gate_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A tensor whose first dimension is 4H gate rows (flattened or not), rows reordered."""
    shaped = t.reshape(4, rows // 4, -1)
    return shaped[list(_GATE_ORDER)].reshape(t.shape)


def _reorder_gates(codes: BucketCodes, rows: int) -> BucketCodes:
    return BucketCodes(*(_gate_rows(part, rows) for part in codes))


def _restore_gates(t: torch.Tensor) -> torch.Tensor:
    """The inverse of the runtime's row order, for an [4H, ...] tensor."""
    inverse = [_GATE_ORDER.index(i) for i in range(4)]
    return t.reshape(4, t.shape[0] // 4, -1)[inverse].reshape(t.shape)


def _lstm_step(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from gates in the runtime's order (i, f, o, g)."""
    hidden = c.shape[-1]
    sig = torch.sigmoid(gates[:, : 3 * hidden])
    c = torch.addcmul(
        sig[:, hidden : 2 * hidden] * c, sig[:, :hidden], torch.tanh(gates[:, 3 * hidden :])
    )
    return sig[:, 2 * hidden :] * torch.tanh(c), c


class Int4LSTMCell(nn.Module):
    """``nn.LSTMCell`` on the int4 kernel: ``[W_ih | W_hh]`` as one [4H, I + H] matrix (its
    groups are those of the two weights), so one kernel call per step on ``[x; h]``; the gate
    arithmetic in the caller's dtype."""

    def __init__(self, weight: Int4Matrix, bias: torch.Tensor | None, input_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, weight.n // 4
        self.weight_int4 = weight
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        h, c = hx
        gates = _with_bias(x, self.weight_int4.matmul(torch.cat([x, h.to(x.dtype)], 1)), self.bias)
        h, c = _lstm_step(gates, c.to(gates.dtype))
        return (h[0], c[0]) if unbatched else (h, c)

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_ih, weight_hh) in PyTorch's layout, as the kernel multiplies with them."""
        joined = _restore_gates(self.weight_int4.dequantize())
        return joined[:, : self.input_size], joined[:, self.input_size :]

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, int4"


class Int4LSTM(nn.Module):
    """``nn.LSTM`` (stacked layers, bidirectional, ``batch_first``, packed sequences; not
    ``proj_size``) on the int4 kernel: per layer and direction, the input projection of every
    time step in one kernel call, then the hidden projection step by step over the sequences
    still running (a packed batch is sorted by length, so they are a prefix of it). Inter-layer
    dropout is not applied (inference)."""

    def __init__(
        self,
        weights: list[tuple[Int4Matrix, Int4Matrix, torch.Tensor | None]],
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        batch_first: bool,
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional, self.batch_first = bidirectional, batch_first
        self.ih = nn.ModuleList(w[0] for w in weights)
        self.hh = nn.ModuleList(w[1] for w in weights)
        for i, (_, _, bias) in enumerate(weights):
            bias = None if bias is None else bias.detach().float().clone()
            self.register_buffer(f"bias_{i}", bias)

    def dequantized_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_ih, weight_hh) of layer-and-direction ``index`` in PyTorch's layout."""
        return (
            _restore_gates(self.ih[index].dequantize()),
            _restore_gates(self.hh[index].dequantize()),
        )

    def _direction(
        self,
        index: int,
        data: torch.Tensor,
        sizes: list[int],
        state: tuple[torch.Tensor, torch.Tensor],
        reverse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer and direction over packed ``data`` ([sum(sizes), I], time-major, the
        running sequences first at each step); returns (output data, h_n, c_n)."""
        projected = _with_bias(data, self.ih[index].matmul(data), getattr(self, f"bias_{index}"))
        h, c = state[0].clone(), state[1].clone()
        hh = self.hh[index]
        out = data.new_empty(data.shape[0], self.hidden_size)
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
        for t in steps:
            n, start = sizes[t], starts[t]
            gates = projected[start : start + n] + hh.matmul(h[:n])
            h_new, c_new = _lstm_step(gates, c[:n])
            out[start : start + n] = h_new
            h[:n], c[:n] = h_new, c_new
        return out, h, c

    def forward(
        self,
        input: torch.Tensor | PackedSequence,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, torch.Tensor]]:
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        if packed:
            data, sizes = input.data, input.batch_sizes.tolist()
            batch = sizes[0]
        else:
            x = input.unsqueeze(1) if unbatched else input
            x = x.transpose(0, 1) if self.batch_first and not unbatched else x
            steps, batch = x.shape[0], x.shape[1]
            data, sizes = x.reshape(steps * batch, -1), [batch] * steps
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            zeros = data.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
            hx = (zeros, zeros)
        elif unbatched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if packed and input.sorted_indices is not None:  # states in the packed batch's order
            hx = tuple(s.index_select(1, input.sorted_indices) for s in hx)
        h_n, c_n = [], []
        layer_input = data
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                i = layer * dirs + d
                state = (hx[0][i].to(data.dtype), hx[1][i].to(data.dtype))
                out, h, c = self._direction(i, layer_input, sizes, state, d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if dirs == 1 else torch.cat(outs, dim=1)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed:
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
                c_n = c_n.index_select(1, input.unsorted_indices)
            output = PackedSequence(
                layer_input, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
            return output, (h_n, c_n)
        output = layer_input.reshape(len(sizes), batch, -1)
        if unbatched:
            return output[:, 0], (h_n[:, 0], c_n[:, 0])
        return (output.transpose(0, 1) if self.batch_first else output), (h_n, c_n)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, int4"
        )


class CodedEmbedding(nn.Module):
    """``nn.Embedding`` whose rows are looked up from the stored codes (two 4-bit codes a
    byte) and decoded exactly as the packed file decodes them; no dense table is kept. Needs
    rows of whole buckets (``embedding_dim`` a multiple of the bucket size)."""

    def __init__(
        self, spec: QuantSpec, codes: BucketCodes, shape: tuple[int, int], padding_idx: int | None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.padding_idx = padding_idx
        self.spec = spec
        rows = codes.codes.reshape(shape)
        self.nibbles = spec.bits <= 4 and self.embedding_dim % 2 == 0
        # code - 8 (kernel grid) or code (min-max grid) of every byte: one lookup decodes a
        # row's bytes (two codes each when they hold nibbles) into the levels to scale.
        shift = 8.0 if spec.method == INT4_KERNEL else 0.0
        byte = torch.arange(256)
        if self.nibbles:
            rows = rows[:, ::2] | (rows[:, 1::2] << 4)
            levels = torch.stack([byte & 0xF, byte >> 4], dim=1).float() - shift
        else:
            levels = byte.float() - shift
        self.register_buffer("levels", levels)
        self.register_buffer("codes", rows.to(torch.uint8).contiguous())
        per_row = self.embedding_dim // spec.bucket_size
        pair = torch.stack([codes.scale.float(), codes.offset.float()], dim=1)  # exact values
        self.register_buffer("pair", pair.reshape(-1, per_row, 2).contiguous())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        levels = self.levels[self.codes[index].long()]
        grouped = levels.view(*index.shape, -1, self.spec.bucket_size)
        pair = self.pair[index]
        # offset + level * scale: the product is exact, the sum rounds once, as in decoding.
        values = torch.addcmul(pair[..., 1:], grouped, pair[..., :1])
        return values.view(*index.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The dense table, decoded (for code that reads ``.weight``; costs fp32 memory)."""
        return self.forward(torch.arange(self.num_embeddings, device=self.codes.device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.method} codes"


# --------------------------------------------------------------------------------------------
# Conversion.


@dataclass(frozen=True)
class RuntimeEntry:
    """One module with quantized weights, and how it runs."""

    name: str
    kind: str  # the module's class before conversion
    path: str  # "int4 kernel", "codes lookup" or "dense"
    why: str = ""  # for "dense": why not the kernel


@dataclass
class RuntimeReport:
    """What :func:`to_int4_runtime_` converted, module by module."""

    entries: list[RuntimeEntry] = field(default_factory=list)

    @property
    def on_kernel(self) -> list[str]:
        return [e.name for e in self.entries if e.path == "int4 kernel"]

    @property
    def path(self) -> str:
        """ "int4" when any module runs on the int4 kernel, else "fp32"."""
        return "int4" if self.on_kernel else "fp32"

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.path] = counts.get(e.path, 0) + 1
        what = {"int4 kernel": "on the int4 kernel", "codes lookup": "looked up from codes"}
        parts = [f"{n} {what.get(p, 'decoded to dense weights')}" for p, n in counts.items()]
        return ", ".join(parts) or "nothing converted"

    def __str__(self) -> str:
        lines = [f"{'module':<40} {'type':<10} {'runs as':<13} why not the kernel"]
        for e in self.entries:
            lines.append(f"{e.name[:40]:<40} {e.kind:<10} {e.path:<13} {e.why}")
        return "\n".join(lines)


REPORT_ATTR = "int4_runtime_report"


def _plain_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor a plain name (``"fc.weight"``) reads, parametrized or not."""
    module_name, _, tensor = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    value = getattr(module, tensor, None)
    return value if isinstance(value, torch.Tensor) else None


def _codes_from(model: nn.Module, source: object) -> dict[str, PackedCodes]:
    if isinstance(source, (str, os.PathLike)):
        return load_packed_codes(source)
    if source is None:
        from compressor.surgery.quantize import quantization_record

        source = quantization_record(model)
    if isinstance(source, QuantRecord):
        found = {}
        for name, spec in source.specs.items():
            tensor = _plain_tensor(model, name)
            if name in source.codes and tensor is not None:
                shape = tuple(tensor.shape)
                found[name] = PackedCodes(spec, shape, tensor.dtype, source.codes[name])
        return found
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(
        f"source must be a packed file, a QuantRecord or None, got {type(source).__name__}"
    )


def _full(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


@torch.no_grad()
def _check_values(name: str, stored: PackedCodes, current: torch.Tensor | None) -> None:
    """The model must hold exactly the values its codes decode to (the same model)."""
    if current is None or current.is_meta:
        return
    current = current.detach()
    same = tuple(current.shape) == tuple(stored.shape) and torch.equal(
        stored.spec.decode(stored.codes, stored.shape, current.dtype), current.cpu()
    )
    if not same:
        raise ValueError(
            f"{name}: the model's weight is not what these codes decode to (another model, or "
            "weights changed after training?)"
        )


def _kernel_ready(stored: PackedCodes | None) -> str:
    """Why a weight cannot run on the kernel ('' when it can)."""
    if stored is None:
        return "not quantized"
    if stored.spec.method != INT4_KERNEL:
        return f"{stored.spec.method} {stored.spec.bits}-bit grid, not the kernel's"
    if not stored.spec.runs_on_int4_kernel(stored.shape):
        return f"shape {stored.shape} is not in groups of {stored.spec.bucket_size}"
    return ""


def _bias(module: nn.Module, *names: str) -> torch.Tensor | None:
    found = [getattr(module, n, None) for n in names]
    found = [b.detach().float() for b in found if b is not None]
    if not found:
        return None
    total = found[0].clone()
    for b in found[1:]:
        total += b
    return total


def _gate_bias(module: nn.Module, rows: int, *names: str) -> torch.Tensor | None:
    bias = _bias(module, *names)
    return None if bias is None else _gate_rows(bias, rows)


def _matrix(stored: PackedCodes, device: torch.device) -> Int4Matrix:
    return Int4Matrix(stored.codes, stored.shape, stored.spec.bucket_size, device)


def _convert_linear(name, module, codes, device):
    stored = codes.get(_full(name, "weight"))
    why = _kernel_ready(stored)
    if why:
        return None, why
    _check_values(_full(name, "weight"), stored, module.weight)
    return Int4Linear(_matrix(stored, device), _bias(module, "bias")), ""


def _convert_cell(name, module, codes, device):
    ih, hh = codes.get(_full(name, "weight_ih")), codes.get(_full(name, "weight_hh"))
    why = _kernel_ready(ih) or _kernel_ready(hh)
    if why:
        return None, why
    if ih.spec.bucket_size != hh.spec.bucket_size:
        return None, "input and hidden weights in different group sizes"
    _check_values(_full(name, "weight_ih"), ih, module.weight_ih)
    _check_values(_full(name, "weight_hh"), hh, module.weight_hh)
    rows, i_size, h_size = ih.shape[0], ih.shape[1], hh.shape[1]
    joined = BucketCodes(  # [W_ih | W_hh] along K, row by row: its groups are theirs
        torch.cat([ih.codes.codes.reshape(rows, i_size), hh.codes.codes.reshape(rows, h_size)], 1),
        torch.cat([ih.codes.offset.reshape(rows, -1), hh.codes.offset.reshape(rows, -1)], 1),
        torch.cat([ih.codes.scale.reshape(rows, -1), hh.codes.scale.reshape(rows, -1)], 1),
    )
    matrix = Int4Matrix(
        _reorder_gates(joined, rows), (rows, i_size + h_size), ih.spec.bucket_size, device
    )
    return Int4LSTMCell(matrix, _gate_bias(module, rows, "bias_ih", "bias_hh"), i_size), ""


def _convert_lstm(name, module, codes, device):
    if getattr(module, "proj_size", 0):
        return None, "LSTM with proj_size"
    weights = []
    for layer in range(module.num_layers):
        for d in range(2 if module.bidirectional else 1):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            pair = []
            for tensor in (f"weight_ih{suffix}", f"weight_hh{suffix}"):
                stored = codes.get(_full(name, tensor))
                why = _kernel_ready(stored)
                if why:
                    return None, f"{tensor}: {why}"
                _check_values(_full(name, tensor), stored, getattr(module, tensor))
                codes_in_order = _reorder_gates(stored.codes, stored.shape[0])
                group = stored.spec.bucket_size
                pair.append(Int4Matrix(codes_in_order, stored.shape, group, device))
            bias = _gate_bias(
                module, 4 * module.hidden_size, f"bias_ih{suffix}", f"bias_hh{suffix}"
            )
            weights.append((*pair, bias))
    converted = Int4LSTM(
        weights,
        module.input_size,
        module.hidden_size,
        module.num_layers,
        module.bidirectional,
        module.batch_first,
    )
    return converted, ""


def _convert_embedding(name, module, codes, device):
    stored = codes.get(_full(name, "weight"))
    if stored is None:
        return None, "not quantized"
    spec = stored.spec
    if spec.method not in ("uniform", INT4_KERNEL) or spec.bucket_size is None:
        return None, f"{spec.method} grid"
    if len(stored.shape) != 2 or stored.shape[1] % spec.bucket_size:
        return None, f"rows of {stored.shape[-1]} are not whole buckets of {spec.bucket_size}"
    if module.max_norm is not None:
        return None, "max_norm renormalises the table"
    _check_values(_full(name, "weight"), stored, module.weight)
    return CodedEmbedding(spec, stored.codes, stored.shape, module.padding_idx).to(device), ""


_CONVERTERS = {
    nn.LSTMCell: (_convert_cell, "int4 kernel"),
    nn.LSTM: (_convert_lstm, "int4 kernel"),
    nn.Linear: (_convert_linear, "int4 kernel"),
    nn.Embedding: (_convert_embedding, "codes lookup"),
}


def to_int4_runtime_(
    model: nn.Module,
    source: str | os.PathLike | QuantRecord | Mapping[str, PackedCodes] | None = None,
) -> RuntimeReport:
    """Put the modules of ``model`` whose weights are on the int4 kernel grid on the int4
    kernel, in place; returns (and leaves in ``model.int4_runtime_report``) which modules run
    where.

    ``source`` gives the codes: a packed file written by ``compressor.save_packed`` (the model
    already holds its decoded weights, e.g. from ``compressor.load_packed``), a
    :class:`QuantRecord` with codes, or None for the model's own record (a model quantized with
    ``QuantConfig(grid="int4_kernel")``, materialized or not). Each converted weight is checked
    to equal what its codes decode to. Modules on other grids, or whose shapes the kernel cannot
    take, stay as they are (embeddings on the min-max grid are looked up from their codes too).
    ``nn.Linear``, ``nn.LSTM``, ``nn.LSTMCell`` and ``nn.Embedding`` themselves are converted,
    not subclasses (which may compute differently). The model is converted on the device of
    each module's parameters.
    """
    codes = _codes_from(model, source)
    if not any(c.spec.method == INT4_KERNEL for c in codes.values()):
        raise ValueError(
            "no weight of this model is on the int4 kernel grid: quantize it with "
            "QuantConfig(grid='int4_kernel') (onmt_train -quant_grid int4_kernel) to run it on "
            "the kernel"
        )
    report = RuntimeReport()
    for name, module in list(model.named_modules()):
        kind = parametrize.type_before_parametrizations(module)
        converter = _CONVERTERS.get(kind)
        if converter is None or not name:
            continue
        convert, path = converter
        params = list(module.parameters())
        device = params[0].device if params else torch.device("cpu")
        converted, why = convert(name, module, codes, device)
        if converted is None:
            if why != "not quantized":
                report.entries.append(RuntimeEntry(name, kind.__name__, "dense", why))
            continue
        _replace(model, module, converted)
        report.entries.append(RuntimeEntry(name, kind.__name__, path))
    model.__dict__[REPORT_ATTR] = report
    return report


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` sits (a module shared by several parents: in each)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


RUNTIME_ENV = "QDISTILL_RUNTIME"
RUNTIME_CHOICES = ("auto", "int4", "fp32")


def runtime_choice() -> str:
    """The user's choice in ``QDISTILL_RUNTIME``: "auto" (default), "int4" or "fp32"."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if value not in RUNTIME_CHOICES:
        raise ValueError(f"{RUNTIME_ENV}={value!r}: choose one of {', '.join(RUNTIME_CHOICES)}")
    return value


def has_kernel_grid(path: str | os.PathLike) -> bool:
    """Whether a file is a packed file with weights on the int4 kernel grid (header only)."""
    from compressor.format.packed import is_packed, packed_info

    return is_packed(path) and any(
        i.spec is not None and i.spec.method == INT4_KERNEL for i in packed_info(path)
    )


def run_packed_on_int4_(
    model: nn.Module, path: str | os.PathLike | None, choice: str | None = None
) -> tuple[str, str]:
    """What the tools do after loading a model from ``path``: put it on the int4 runtime when
    ``choice`` (default: ``QDISTILL_RUNTIME``) allows it, the file holds weights on the kernel
    grid and this PyTorch has the kernel for the model's device. Returns ("int4" or "fp32",
    a one-line description of the path taken and why). ``choice="int4"`` raises
    ``ValueError`` where int4 cannot run."""
    choice = runtime_choice() if choice is None else choice
    if choice not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {RUNTIME_CHOICES}, got {choice!r}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    reason = ""
    if choice == "fp32":
        reason = f"{RUNTIME_ENV}=fp32"
    elif path is None or not has_kernel_grid(path):
        reason = "the model was not trained on the int4 kernel grid"
    elif not int4_kernel_available(device):
        reason = f"this PyTorch {torch.__version__} has no int4 kernel for {device.type}"
    if reason:
        if choice == "int4":
            raise ValueError(f"{RUNTIME_ENV}=int4 but {reason}")
        return "fp32", f"runtime fp32 ({reason})"
    before = resident_bytes(model)
    report = to_int4_runtime_(model, path)
    after = resident_bytes(model)
    return report.path, (
        f"runtime {report.path} (modules: {report.summary()}; weights resident "
        f"{after / 2**20:.1f} MiB, {before / 2**20:.1f} MiB decoded; {RUNTIME_ENV}=fp32 runs "
        "the decoded weights)"
    )


def runtime_report(model: nn.Module) -> RuntimeReport | None:
    """The report :func:`to_int4_runtime_` left on ``model`` (None: never converted)."""
    return model.__dict__.get(REPORT_ATTR)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


__all__ = [
    "CodedEmbedding",
    "Int4LSTM",
    "Int4LSTMCell",
    "Int4Linear",
    "Int4Matrix",
    "RuntimeEntry",
    "RuntimeReport",
    "int4_kernel_available",
    "has_kernel_grid",
    "resident_bytes",
    "run_packed_on_int4_",
    "runtime_choice",
    "runtime_report",
    "to_int4_runtime_",
]
