"""The bucketed quantizers against an independent reference, and their properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressor
from compressor.quantization import grids as quantizers

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_uniform(x: np.ndarray, bits: int, bucket: int | None) -> np.ndarray:
    """The paper's quantizer written plainly in float64, one bucket at a time."""
    flat = x.astype(np.float64).ravel()
    d = flat.size if bucket is None else bucket
    out = np.empty_like(flat)
    levels = 2**bits - 1
    for start in range(0, flat.size, d):
        chunk = flat[start : start + d]
        lo, hi = chunk.min(), chunk.max()
        if hi == lo:
            out[start : start + d] = chunk
            continue
        scaled = (chunk - lo) / (hi - lo)
        out[start : start + d] = lo + np.round(scaled * levels) / levels * (hi - lo)
    return out.reshape(x.shape)


tensors = st.builds(
    lambda shape, seed, scale: (
        torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    ),
    st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1e-3, 1.0, 50.0]),
)
bucket_sizes = st.sampled_from([None, 1, 3, 16, 64, 256])


def buckets_of(values: torch.Tensor, bucket: int | None) -> list[torch.Tensor]:
    flat = values.reshape(-1)
    d = flat.numel() if bucket is None else bucket
    return list(flat.split(d))


@FAST
@given(tensors, st.integers(1, 8), bucket_sizes)
def test_agrees_with_reference(x, bits, bucket):
    q = compressor.quantize_tensor(x, bits, bucket)
    ref = torch.from_numpy(reference_uniform(x.numpy(), bits, bucket)).float()
    # Scales keep 16 significant bits, so levels sit within span * 2**-15 of the reference's; a
    # value may land on the neighbouring level only where it is that close to a rounding tie.
    levels = 2**bits - 1
    for xb, qb, rb in zip(buckets_of(x, bucket), buckets_of(q, bucket), buckets_of(ref, bucket)):
        span = float(xb.max() - xb.min())
        step = span / levels
        tol = 1e-4 * span + 1e-12
        close = (qb - rb).abs() <= tol
        on_neighbour = ((qb - rb).abs() - step).abs() <= tol
        assert bool((close | on_neighbour).all())
        if span > 0 and bool(on_neighbour.any()):
            position = (xb.double() - xb.min().double()) / span * levels
            from_tie = (position - position.floor() - 0.5).abs()
            assert bool((from_tie[on_neighbour & ~close] <= levels * 2**-15 + 1e-3).all())


@FAST
@given(tensors, st.integers(1, 8), bucket_sizes)
def test_bucket_properties(x, bits, bucket):
    q = compressor.quantize_tensor(x, bits, bucket)
    assert q.shape == x.shape and q.dtype == x.dtype
    for xb, qb in zip(buckets_of(x, bucket), buckets_of(q, bucket)):
        lo, hi = xb.min(), xb.max()
        assert qb.unique().numel() <= 2**bits
        assert bool((qb >= lo).all() and (qb <= hi).all())
        alpha = float(hi - lo)
        bound = alpha / (2 * (2**bits - 1)) * (1 + 2e-5) + 1e-7 * abs(float(lo))
        assert float((qb - xb).abs().max()) <= bound


@FAST
@given(tensors, st.integers(1, 8), bucket_sizes)
def test_encode_decode_exact_and_idempotent(x, bits, bucket):
    q = compressor.quantize_tensor(x, bits, bucket)
    encoded = compressor.encode_uniform(x, bits, bucket)
    assert encoded.codes.dtype == torch.uint8 and int(encoded.codes.max()) < 2**bits
    assert torch.equal(compressor.decode_uniform(encoded, x.shape, bucket), q)
    assert torch.equal(compressor.quantize_tensor(q, bits, bucket), q)


def test_constant_bucket_is_exact_and_finite():
    x = torch.cat([torch.full((256,), 0.3141), torch.zeros(256), torch.randn(100)])
    for bits in range(1, 9):
        q = compressor.quantize_tensor(x, bits, 256)
        assert torch.isfinite(q).all()
        assert torch.equal(q[:512], x[:512])


def test_partial_last_bucket_uses_its_own_range():
    x = torch.cat([torch.randn(256) * 100, torch.tensor([1.0, 2.0, 4.0])])
    q = compressor.quantize_tensor(x, 2, 256)
    assert torch.equal(q[256:], torch.tensor([1.0, 2.0, 4.0]))


def test_bucket_none_is_one_bucket():
    x = torch.randn(3000)
    assert compressor.quantize_tensor(x, 3, None).unique().numel() <= 8


def test_stochastic_rounding_is_unbiased():
    x = torch.rand(4096) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [compressor.quantize_tensor(x, 2, 64, "stochastic", generator=gen) for _ in range(400)]
    )
    step = 2 / 3  # worst-case level spacing for a range of at most 2
    # Each draw's deviation is bounded by a level step; the mean of 400 independent draws has
    # a standard error of at most step / (2 * 20) per weight.
    assert float((draws.mean(0) - x).abs().mean()) < step / 40
    assert float((draws.mean(0) - x).mean().abs()) < step / 200
    nearest_bias = float((compressor.quantize_tensor(x, 2, 64) - x).abs().mean())
    assert float((draws.mean(0) - x).abs().mean()) < nearest_bias / 3


def test_stochastic_rounding_is_reproducible_with_a_generator():
    x = torch.randn(1000)
    a = compressor.quantize_tensor(x, 3, 100, "stochastic", torch.Generator().manual_seed(7))
    b = compressor.quantize_tensor(x, 3, 100, "stochastic", torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x = torch.randn(777).to(dtype)
    q = compressor.quantize_tensor(x, 4, 256)
    assert q.dtype == dtype
    expected = compressor.quantize_tensor(x.float(), 4, 256).to(dtype)
    assert torch.equal(q, expected)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4, "bucket_size": 0}, "bucket_size"),
        ({"bits": 4, "bucket_size": -3}, "bucket_size"),
        ({"bits": 4, "rounding": "up"}, "rounding"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        compressor.quantize_tensor(torch.randn(10), **kwargs)


def test_integer_tensor_is_refused():
    with pytest.raises(ValueError, match="floating-point"):
        compressor.quantize_tensor(torch.arange(10), 4)


@FAST
@given(tensors, st.integers(1, 64), bucket_sizes, st.sampled_from(["quantile", "uniform"]))
def test_nonuniform_properties(x, num_points, bucket, init):
    if init == "quantile":
        points = compressor.quantile_points(x, num_points, bucket)
    else:
        points = compressor.uniform_points(num_points)
    assert bool((points[1:] >= points[:-1]).all())
    assert float(points.min()) >= 0 and float(points.max()) <= 1
    q = compressor.quantize_nonuniform(x, points, bucket)
    encoded = compressor.encode_nonuniform(x, points, bucket)
    assert torch.equal(compressor.decode_nonuniform(encoded, points, x.shape, bucket), q)
    for xb, qb in zip(buckets_of(x, bucket), buckets_of(q, bucket)):
        assert qb.unique().numel() <= num_points
        assert bool((qb >= xb.min()).all() and (qb <= xb.max()).all())


def test_nonuniform_maps_to_nearest_point():
    x = torch.tensor([0.0, 0.1, 0.24, 0.26, 0.9, 1.0])
    points = torch.tensor([0.0, 0.5, 1.0])
    q = compressor.quantize_nonuniform(x, points, None)
    assert torch.equal(q, torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0]))


def test_quantile_points_follow_the_weights():
    x = torch.cat([torch.zeros(900), torch.linspace(0, 1, 100)])
    points = compressor.quantile_points(x, 4, None)
    assert float(points[1]) == 0.0  # most of the mass sits at zero


def test_fused_kernel_matches_eager(monkeypatch):
    x = torch.randn(64 * 256 + 17)
    monkeypatch.setattr(quantizers, "FUSED_MIN_NUMEL", 1)
    fused = compressor.quantize_tensor(x, 4, 256)
    monkeypatch.setenv("QDISTILL_COMPILE", "0")
    eager = compressor.quantize_tensor(x, 4, 256)
    assert torch.equal(fused, eager)


def test_bucket_larger_than_the_tensor_is_one_bucket():
    """A declared bucket far larger than the tensor (as a hostile file may declare) must not
    be padded out: it is one bucket of the tensor's own size."""
    x = torch.randn(10, 12)
    huge = 2**31
    assert torch.equal(
        compressor.quantize_tensor(x, 3, huge), compressor.quantize_tensor(x, 3, None)
    )
    encoded = compressor.encode_uniform(x, 3, None)
    assert torch.equal(
        compressor.decode_uniform(encoded, x.shape, huge),
        compressor.decode_uniform(encoded, x.shape, None),
    )
    points = compressor.uniform_points(4)
    codes = compressor.encode_nonuniform(x, points, None)
    assert torch.equal(
        compressor.decode_nonuniform(codes, points, x.shape, huge),
        compressor.decode_nonuniform(codes, points, x.shape, None),
    )
