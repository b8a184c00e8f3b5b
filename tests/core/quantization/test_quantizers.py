"""Gap checks for the core quantizer: the fused compiled kernel is really taken (not a silent
eager fallback) and gives the same bits as eager ops, also at exact rounding ties and for
half-precision inputs."""

import warnings

import pytest
import torch

import compressor
from compressor.quantization import grids as quantizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_kernel_is_used_and_bit_identical(monkeypatch, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32 * 256 + 5, generator=generator)
    # Exact ties on the 3-bit grid of a [0, 7] bucket: k + 0.5 must round the same on both paths.
    x[:256] = torch.arange(256) % 15 * 0.5
    x = x.to(dtype)
    monkeypatch.setattr(quantizers, "FUSED_MIN_NUMEL", 1)
    monkeypatch.delenv("QDISTILL_COMPILE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile failure would warn and fall back to eager
        fused = compressor.quantize_tensor(x, 3, 256)
    assert quantizers._fused_kernel not in (None, False)
    monkeypatch.setenv("QDISTILL_COMPILE", "0")
    eager = compressor.quantize_tensor(x, 3, 256)
    assert fused.dtype == dtype
    assert torch.equal(
        fused.view(torch.int16 if dtype != torch.float32 else torch.int32),
        eager.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


def test_fused_path_is_not_taken_for_training_reads(monkeypatch):
    """A weight that needs a gradient must not go through the compiled kernel (no compile per
    call in training); the value is the same either way."""
    monkeypatch.setattr(quantizers, "FUSED_MIN_NUMEL", 1)

    def must_not_run(*args):
        raise AssertionError("compiled kernel called on a weight that needs a gradient")

    monkeypatch.setattr(quantizers, "_fused_kernel", must_not_run)
    monkeypatch.delenv("QDISTILL_COMPILE", raising=False)
    w = torch.randn(4, 300, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = compressor.quantize_tensor(w, 4, 64)
    monkeypatch.setenv("QDISTILL_COMPILE", "0")
    assert torch.equal(q, compressor.quantize_tensor(w.detach(), 4, 64))
