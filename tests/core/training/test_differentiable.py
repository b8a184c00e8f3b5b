"""Differentiable quantization (Algorithm 2): learned points, their gradient, their constraints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compressor
from compressor import save_packed
from compressor.format.packed import load_packed
from compressor.quantization.grids import (
    BucketCodes,
    decode_nonuniform,
    encode_nonuniform,
    quantile_points,
    quantize_nonuniform,
)
from compressor.surgery.quantizers import DifferentiableQuantizer
from compressor.training.differentiable import (
    constrain_points_,
    differentiable_quantization,
    freeze_shadow_weights_,
    keep_points_constrained,
    point_parameters,
)
from compressor.training.distillation import distillation_loss


def _weight(shape=(10, 30), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bucket_size", [64, None, 7])
def test_forward_is_nonuniform_quantization(bucket_size):
    w = _weight()
    points = quantile_points(w, 6, bucket_size)
    quantizer = DifferentiableQuantizer(points, bucket_size)
    q = quantizer(w)
    assert torch.equal(q, quantize_nonuniform(w, points, bucket_size))
    spec = quantizer.spec
    assert spec.method == "nonuniform" and spec.num_levels == 6
    assert torch.equal(spec.decode(quantizer.encode(w), w.shape, w.dtype), q)


@pytest.mark.parametrize("bucket_size", [64, 7])
def test_point_gradient_is_the_papers(bucket_size):
    """dL/dp_j = sum over weights assigned to p_j of (bucket scale) * dL/dq, with the scale the
    decoder multiplies by (the bucket range rounded to 12 bits)."""
    w = _weight(seed=1).requires_grad_(True)
    points = quantile_points(w, 5, bucket_size)
    quantizer = DifferentiableQuantizer(points, bucket_size)
    upstream = _weight(seed=2)
    (quantizer(w) * upstream).sum().backward()

    codes = encode_nonuniform(w.detach(), points, bucket_size)
    flat_codes = codes.codes.long()
    bucket = torch.arange(w.numel()) // (bucket_size or w.numel())
    want = torch.zeros(5, dtype=torch.float64)
    for i in range(w.numel()):
        want[flat_codes[i]] += codes.scale[bucket[i]].double() * upstream.reshape(-1)[i].double()
    torch.testing.assert_close(quantizer.points.grad.double(), want, rtol=1e-5, atol=1e-6)
    # Weights get the straight-through gradient.
    assert torch.equal(w.grad, upstream)

    # Finite differences of the decoder with the assignment held fixed (as the paper's gradient
    # assumes): the loss is linear in the points, so a step of one 12-bit ulp is exact.
    base = (decode_nonuniform(codes, points, w.shape, bucket_size).double() * upstream).sum()
    for j in range(5):
        eps = 2.0**-12
        moved = points.clone()
        moved[j] = moved[j] + eps if moved[j] + eps <= 1 else moved[j] - eps
        step = moved[j] - points[j]
        bumped = BucketCodes(codes.codes, codes.offset, codes.scale)
        value = (decode_nonuniform(bumped, moved, w.shape, bucket_size).double() * upstream).sum()
        if torch.equal(torch.sort(moved).values, moved):  # still ordered: same code meaning
            assert ((value - base) / step).item() == pytest.approx(want[j].item(), rel=1e-4)


def test_gradient_follows_points_given_out_of_order():
    w = _weight(seed=3)
    quantizer = DifferentiableQuantizer(torch.tensor([0.0, 0.5, 1.0]), None)
    with torch.no_grad():
        quantizer.points.copy_(torch.tensor([1.0, 0.0, 0.5]))  # what a raw SGD step may leave
    upstream = torch.ones_like(w)
    (quantizer(w) * upstream).sum().backward()
    ordered = DifferentiableQuantizer(torch.tensor([0.0, 0.5, 1.0]), None)
    (ordered(w) * upstream).sum().backward()
    torch.testing.assert_close(quantizer.points.grad, ordered.points.grad[[2, 0, 1]])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 4))


def _batches(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(64, 16, generator=gen)
        out.append((x, (x @ w).argmax(1)))
    return out


def _trained_mlp():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for x, y in _batches(60, seed=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_quantize_config_builds_learnable_points_with_given_counts():
    model = _mlp()
    config = compressor.QuantConfig(
        bits=2, method="differentiable", num_points={"0.weight": 3}, point_init="uniform"
    )
    compressor.quantize_(model, config)
    counts = {n: q.points.numel() for n, _, _, q in compressor.quantized_tensors(model)}
    assert counts == {"0.weight": 3, "2.weight": 4}
    assert all(isinstance(p, nn.Parameter) for p in point_parameters(model))
    # Parameter names carry the points, so an optimizer sees them.
    names = [n for n, _ in model.named_parameters()]
    assert "0.parametrizations.weight.0.points" in names


def test_points_stay_sorted_and_bounded_after_every_step_and_weights_frozen():
    model = compressor.quantize_(_mlp(), compressor.QuantConfig(bits=2, method="differentiable"))
    freeze_shadow_weights_(model)
    shadows = {k: v.clone() for k, v in compressor.shadow_state_dict(model).items()}
    optimizer = torch.optim.SGD(point_parameters(model), lr=50.0)  # big steps to break order
    handle = keep_points_constrained(optimizer, model)
    start = [p.detach().clone() for p in point_parameters(model)]
    for x, y in _batches(15):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for p in point_parameters(model):
            assert torch.all(p >= 0) and torch.all(p <= 1)
            assert torch.equal(p, torch.sort(p).values)
    handle.remove()
    assert any(not torch.equal(a, b) for a, b in zip(start, point_parameters(model)))
    for name, value in compressor.shadow_state_dict(model).items():
        if name.endswith("weight"):
            assert torch.equal(value, shadows[name]), name
    # Without the hook a step may leave them unsorted; constrain_points_ repairs that.
    with torch.no_grad():
        point_parameters(model)[0].copy_(torch.tensor([0.9, -0.2, 1.7, 0.1]))
    constrain_points_(model)
    assert point_parameters(model)[0].tolist() == [
        0.0,
        0.10000000149011612,
        0.8999999761581421,
        1.0,
    ]


@pytest.mark.parametrize("teacher_kind", ["teacher", "self"])
def test_algorithm_2_lowers_the_distillation_term_and_packs(teacher_kind, tmp_path):
    full = _trained_mlp()
    teacher = copy.deepcopy(full) if teacher_kind == "teacher" else None
    student = copy.deepcopy(full)
    compressor.quantize_(
        student,
        compressor.QuantConfig(
            bits=2, method="differentiable", bucket_size=64, point_init="uniform"
        ),
    )
    shadows = {k: v.clone() for k, v in compressor.shadow_state_dict(student).items()}
    x0, y0 = _batches(20, seed=5)[0]
    with torch.no_grad():  # the signal comes from the full-precision model, not the student
        start = distillation_loss(student(x0), full(x0), y0, 1.0, 1.0).item()
    history = differentiable_quantization(
        student,
        _batches(20, seed=5),
        steps=60,
        teacher=teacher,
        lr=0.02,
        temperature=1.0,
        alpha=1.0,
    )
    assert history[0]["distillation"] == pytest.approx(start, rel=1e-5)
    first = sum(r["distillation"] for r in history[:10]) / 10
    last = sum(r["distillation"] for r in history[-10:]) / 10
    assert last < 0.8 * first
    for name, value in compressor.shadow_state_dict(student).items():
        assert torch.equal(value, shadows[name])
    for p in point_parameters(student):
        assert torch.equal(p, torch.sort(p.clamp(0, 1)).values)
    # The packed file decodes to exactly the values the model computes with.
    expected = compressor.quantized_state_dict(student)
    save_packed(student, tmp_path / "dq.qd")
    loaded, _ = load_packed(tmp_path / "dq.qd")
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    compressor.materialize_(student)
    for name, value in expected.items():
        assert torch.equal(student.state_dict()[name], value)


def test_algorithm_2_needs_learnable_points():
    model = compressor.quantize_(_mlp(), compressor.QuantConfig(bits=2))
    with pytest.raises(ValueError, match="method='differentiable'"):
        differentiable_quantization(model, _batches(2), steps=1)
