"""The int4 kernel grid (issue 16): bf16 scale and zero per bucket, values
``(code - 8) * scale + zero``, checked against PyTorch's int4 kernel itself."""

from __future__ import annotations

import pytest
import torch

import compressor
from compressor.quantization import grids
from compressor.quantization.record import QuantSpec

needs_kernel = pytest.mark.skipif(
    not compressor.int4_kernel_available("cpu"), reason="this PyTorch has no CPU int4 kernel"
)


def _kernel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int):
    """PyTorch's own op, fed directly (no qdistill code between): x -> x @ W.t()."""
    n, k = codes.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    pair = torch.stack([scale.view(n, k // group).t(), zero.view(n, k // group).t()], dim=2)
    pair = pair.to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, pair)


@needs_kernel
@pytest.mark.parametrize("group", grids.KERNEL_GROUP_SIZES)
def test_the_kernel_multiplies_with_exactly_the_decoded_fp32_values(group):
    gen = torch.Generator().manual_seed(group)
    w = torch.randn(32, 2 * group, generator=gen) * 0.05 + 0.02
    encoded = grids.encode_int4_kernel(w, group)
    values = grids.decode_int4_kernel(encoded, w.shape, group)
    assert torch.equal(values, grids.quantize_int4_kernel(w, group))
    matmul = _kernel(encoded.codes.view(w.shape), encoded.scale, encoded.offset, group)
    k = w.shape[1]
    # An identity input returns each weight, rounded to bf16 (the output dtype).
    assert torch.equal(matmul(torch.eye(k, dtype=torch.bfloat16)).t(), values.bfloat16())
    # Inputs a * e_j return bf16(a * w): with the fp32 value, not its bf16 rounding (which
    # differs from it for most weights), for every weight and several multipliers a.
    assert not torch.equal(values, values.bfloat16().float())
    for seed in range(3):
        a = (1 + torch.randint(1, 128, (k,), generator=gen) / 128).bfloat16()
        got = matmul(torch.diag(a)).t()
        assert torch.equal(got, (values * a.float()).bfloat16()), seed


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (1e-3, 0.0), (1.0, 100.0), (1e-4, 3.0)])
def test_grid_covers_each_bucket_with_bf16_scale_and_zero(scale, shift):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen) * scale + shift
    x[0] = shift  # a constant bucket (two of them)
    encoded = grids.encode_int4_kernel(x, 32)
    for numbers in (encoded.scale, encoded.offset):
        assert torch.equal(numbers, numbers.bfloat16().float())
    assert int(encoded.codes.max()) <= 15
    rows = x.view(-1, 32)
    lo, hi = rows.min(1).values, rows.max(1).values
    assert bool((encoded.offset - 8 * encoded.scale <= lo).all())
    assert bool((encoded.offset + 7 * encoded.scale >= hi).all())
    error = (grids.quantize_int4_kernel(x, 32) - x).view(-1, 32).abs().max(1).values
    assert bool((error <= encoded.scale * 0.5 * (1 + 1e-5) + 1e-30).all())


def test_nearly_as_fine_as_the_minmax_grid():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    kernel = (grids.quantize_int4_kernel(x, 256) - x).pow(2).mean()
    minmax = (grids.quantize_tensor(x, 4, 256) - x).pow(2).mean()
    assert kernel < minmax * 1.05


def test_fused_path_gives_the_same_bits(monkeypatch):
    monkeypatch.setattr(grids, "FUSED_MIN_NUMEL", 1)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.1 + 0.3
    fused = grids.quantize_int4_kernel(x, 64)
    assert grids._fused_kernel_grid not in (None, False)
    monkeypatch.setattr(grids, "FUSED_MIN_NUMEL", 1 << 40)
    assert torch.equal(fused, grids.quantize_int4_kernel(x, 64))


def test_spec_and_config_validation():
    spec = QuantSpec("int4_kernel", 4, 64)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert not spec.reencodes and spec.bucket_bytes == 4
    assert spec.runs_on_int4_kernel((10, 128)) and not spec.runs_on_int4_kernel((10, 96))
    for bad in [dict(bits=3), dict(bucket_size=100), dict(method="nonuniform")]:
        with pytest.raises(ValueError, match="int4_kernel"):
            compressor.QuantConfig(**{"bits": 4, "bucket_size": 64, "grid": "int4_kernel", **bad})
    with pytest.raises(ValueError, match="int4_kernel spec"):
        QuantSpec("int4_kernel", 4, 16)
    with pytest.raises(ValueError, match="grid must be"):
        compressor.QuantConfig(grid="bf16")
