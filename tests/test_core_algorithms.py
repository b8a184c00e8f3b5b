"""Distillation loss, differentiable quantization, bit allocation, LSQ and QKD."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor.bit_allocation import allocate_bits, effective_bits, share_points
from compressor.differentiable import (
    DifferentiableQuantizer,
    constrain_points_,
    differentiable_quantization,
    keep_points_constrained,
    point_parameters,
)
from compressor.distillation import distillation_loss
from compressor.lsq import LsqActivationQuantizer, lsq_quantize
from compressor.qkd import QKDSchedule, qkd_train
from compressor.training import DistillConfig, quantized_distillation

# ---------------------------------------------------------------------------------------------
# Distillation loss.


def _manual_loss(s, t, y, temperature, alpha):
    ce = F.cross_entropy(s, y, reduction="none")
    p_t = F.softmax(t / temperature, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temperature, -1))).sum(-1)
    return (1 - alpha) * ce + alpha * temperature**2 * kl


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.7), (5.0, 0.5), (2.0, 0.0), (3.0, 1.0)])
def test_distillation_loss_matches_its_formula(temperature, alpha):
    torch.manual_seed(0)
    s, t = torch.randn(12, 7), torch.randn(12, 7)
    y = torch.randint(0, 7, (12,))
    y[[2, 5]] = -100
    keep = y != -100
    expected = _manual_loss(s[keep], t[keep], y[keep], temperature, alpha)
    got = distillation_loss(s, t, y, temperature, alpha)
    assert torch.allclose(got, expected.mean(), atol=1e-5)
    assert torch.allclose(
        distillation_loss(s, t, y, temperature, alpha, reduction="sum"), expected.sum(), atol=1e-4
    )


def test_distillation_loss_gradient_against_finite_differences():
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([1, -100, 3, 0])

    def f(logits):
        return distillation_loss(logits, t, y, 2.0, 0.6).double()

    # fp32 inside the loss: compare with a relative tolerance fitting single precision.
    assert torch.autograd.gradcheck(f, (s,), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_teacher_gets_no_gradient_and_soft_mode():
    s = torch.randn(3, 4, 6, requires_grad=True)
    t = torch.randn(3, 4, 6, requires_grad=True)
    loss = distillation_loss(s, t, None, 4.0, 0.3)
    loss.backward()
    assert t.grad is None and s.grad is not None
    p_t = F.softmax(t.detach().reshape(-1, 6) / 4, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s.detach().reshape(-1, 6) / 4, -1))).sum(-1)
    assert torch.allclose(loss, 16 * kl.mean(), atol=1e-5)


def test_half_precision_logits_are_computed_in_fp32():
    s, t = torch.randn(5, 9).half(), torch.randn(5, 9).half()
    y = torch.randint(0, 9, (5,))
    loss = distillation_loss(s, t, y, 1.0, 0.7)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, distillation_loss(s.float(), t.float(), y, 1.0, 0.7))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"reduction": "none"}, "reduction must be one of"),
    ],
)
def test_distillation_loss_bad_settings(kwargs, message):
    args = {"temperature": 1.0, "alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), **args)
    if "reduction" not in kwargs:
        with pytest.raises(ValueError, match=message):
            DistillConfig(args["temperature"], args["alpha"])


def test_mismatched_vocabularies_are_reported():
    with pytest.raises(ValueError, match="vocabularies"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), 1.0, 0.5)


# ---------------------------------------------------------------------------------------------
# Quantized distillation building block.


def test_quantized_distillation_updates_shadows_and_ends_on_the_grid():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compressor.quantize_(student, compressor.QuantConfig(bits=3, bucket_size=32))
    x = torch.randn(64, 8)
    y = teacher(x).argmax(1)
    shadows = [p.detach().clone() for n, p in student.named_parameters() if "original" in n]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    history = quantized_distillation(
        student, teacher, [(x, y)], optimizer, 30, DistillConfig(2.0, 0.9)
    )
    assert all(not p.requires_grad for p in teacher.parameters())
    now = [p for n, p in student.named_parameters() if "original" in n]
    assert all(p.dtype == torch.float32 and not torch.equal(p, b) for p, b in zip(now, shadows))
    assert history[-1]["distillation"] < history[0]["distillation"]
    compressor.training.finish_(student)
    specs = compressor.quantization_specs(student)
    for name, spec in specs.items():
        value = student.get_parameter(name)
        assert torch.equal(value, spec.quantize(value))


# ---------------------------------------------------------------------------------------------
# Differentiable quantization.


def test_point_gradient_is_the_papers():
    torch.manual_seed(0)
    weight = torch.randn(5, 40)
    quantizer = DifferentiableQuantizer(compressor.uniform_points(5), bucket_size=64)
    upstream = torch.randn(5, 40)
    (quantizer(weight) * upstream).sum().backward()
    spec = quantizer.spec
    encoded = spec.encode(weight)
    expected = torch.zeros(5)
    flat_scale = encoded.scale.repeat_interleave(64)[: weight.numel()]
    expected.index_add_(0, encoded.codes.long(), flat_scale * upstream.reshape(-1))
    assert torch.allclose(quantizer.points.grad, expected, atol=1e-5)


def test_point_gradient_against_finite_differences():
    torch.manual_seed(0)
    weight = torch.randn(300, dtype=torch.float32)
    points = torch.tensor([0.0, 0.3, 0.55, 1.0])
    quantizer = DifferentiableQuantizer(points, bucket_size=None)
    upstream = torch.randn(300)
    (quantizer(weight) * upstream).sum().backward()
    # Moving one point a little (and keeping assignments) changes the loss linearly.
    j, h = 2, 2**-10  # a step the 12-bit point grid represents exactly
    moved = points.clone()
    moved[j] += h
    lo, hi = float(weight.min()), float(weight.max())
    codes = quantizer.spec.encode(weight).codes.long()
    value = lambda p: ((lo + p[codes] * (hi - lo)) * upstream).sum()  # noqa: E731
    numeric = (value(moved) - value(points)) / h
    assert math.isclose(float(quantizer.points.grad[j]), float(numeric), rel_tol=2e-3)


def test_points_stay_sorted_and_bounded_while_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    compressor.quantize_(model, compressor.QuantConfig(bits=2, method="differentiable"))
    optimizer = torch.optim.SGD(point_parameters(model), lr=5.0)  # large, to push points out
    keep_points_constrained(optimizer, model)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for _ in range(10):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for p in point_parameters(model):
            assert bool((p[1:] >= p[:-1]).all()) and float(p.min()) >= 0 and float(p.max()) <= 1


def test_algorithm_2_learns_points_with_weights_fixed_and_packs_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(128, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    compressor.quantize_(model, compressor.QuantConfig(bits=2, method="differentiable"))
    shadows = [p.detach().clone() for n, p in model.named_parameters() if "original" in n]
    points = [p.detach().clone() for p in point_parameters(model)]
    history = differentiable_quantization(model, [(x, y)], steps=20, lr=1e-3)
    assert len(history) == 20
    assert all(
        torch.equal(p, b)
        for p, b in zip([p for n, p in model.named_parameters() if "original" in n], shadows)
    )
    assert any(not torch.equal(p, b) for p, b in zip(point_parameters(model), points))
    with torch.no_grad():
        expected = model.eval()(x)
    compressor.save_packed(model, tmp_path / "dq.qd")
    state, _ = compressor.load_packed(tmp_path / "dq.qd")
    fresh = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)


# ---------------------------------------------------------------------------------------------
# Bit allocation.


def test_share_points_conserves_the_budget_and_keeps_half():
    importance = {"a": 10.0, "b": 1.0, "c": 0.0, "d": 5.0}
    counts = share_points(importance, bits=3)
    assert sum(counts.values()) == 4 * 8
    assert all(c >= 4 for c in counts.values())
    assert counts["a"] > counts["d"] > counts["b"] >= counts["c"] == 4
    fractional = effective_bits(counts)
    assert any(not float(b).is_integer() for b in fractional.values())
    assert sum(share_points(importance, 3, total_points=50).values()) == 50


def test_share_points_caps_at_256():
    counts = share_points({"a": 1.0, "b": 0.0}, bits=8, total_points=400)
    assert counts == {"a": 256, "b": 144}


@pytest.mark.parametrize(
    "importance, kwargs, message",
    [
        ({}, {}, "empty budget"),
        ({"a": 1.0, "b": 1.0}, {"total_points": 3}, "below the minimum"),
        ({"a": 1.0}, {"total_points": 300}, "exceeds"),
    ],
)
def test_share_points_errors(importance, kwargs, message):
    with pytest.raises(ValueError, match=message):
        share_points(importance, bits=2, **kwargs)


def test_allocate_bits_favours_the_sensitive_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    with torch.no_grad():
        model[1].weight.mul_(100)  # gradients into layer 0 scale with layer 1's weights
    x = torch.randn(32, 6)

    def loss_fn(m, inputs, target):
        return (m(inputs) - target).pow(2).mean()

    counts = allocate_bits(model, [(x, torch.zeros(32, 6))], loss_fn, bits=2)
    assert sum(counts.values()) == 8 and counts["0.weight"] > counts["1.weight"]
    config = compressor.QuantConfig(bits=2, method="nonuniform", num_points=counts)
    compressor.quantize_(model, config)
    specs = compressor.quantization_specs(model)
    assert len(specs["0.weight"].points) == counts["0.weight"]


# ---------------------------------------------------------------------------------------------
# LSQ and QKD.


def test_lsq_step_gradient_matches_the_paper():
    x = torch.tensor([-3.0, -0.6, 0.2, 0.74, 5.0])
    step = torch.tensor(0.5, requires_grad=True)
    qn, qp, g = -4, 3, 0.25
    lsq_quantize(x, step, qn, qp, g).sum().backward()
    v = x / 0.5
    expected = torch.where(v <= qn, float(qn), torch.where(v >= qp, float(qp), -v + v.round()))
    assert math.isclose(float(step.grad), float(expected.sum() * g), rel_tol=1e-5)


def test_activation_quantizer_signedness_and_levels():
    unsigned = LsqActivationQuantizer(2)
    out = unsigned(torch.rand(1000))
    assert not bool(unsigned.signed) and out.unique().numel() <= 4 and float(out.min()) >= 0
    signed = LsqActivationQuantizer(3)
    out = signed(torch.randn(1000))
    assert bool(signed.signed) and out.unique().numel() <= 8
    with pytest.raises(ValueError, match="act_bits must be an integer from 1 to 8"):
        LsqActivationQuantizer(9)


def test_w4a4_student_packs_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compressor.quantize_(model, compressor.QuantConfig(bits=4, method="lsq", act_bits=4))
    assert hasattr(model[0], "input_quantizer") and hasattr(model[2], "input_quantizer")
    x = torch.randn(20, 8)
    model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), torch.zeros(20, dtype=torch.long)).backward()
    optimizer.step()
    assert model[0].input_quantizer.step.grad is not None
    with torch.no_grad():
        expected = model.eval()(x)
        assert model[0].weight.unique().numel() <= 16
    compressor.save_packed(model, tmp_path / "w4a4.qd")
    state, _ = compressor.load_packed(tmp_path / "w4a4.qd")
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compressor.quantize_(fresh, compressor.QuantConfig(bits=4, method="lsq", act_bits=4))
    compressor.materialize_(fresh)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.eval()(x), expected)


def test_qkd_phases_freeze_and_train_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    student = copy.deepcopy(teacher)
    compressor.quantize_(student, compressor.QuantConfig(bits=4, method="lsq", act_bits=4))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    student(x)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.05)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
    snapshots = []

    def record(step, info):
        snapshots.append((info["phase"], [p.detach().clone() for p in teacher.parameters()]))

    schedule = QKDSchedule(3, 3, 3, temperature=2.0, alpha=0.5)
    history = qkd_train(student, teacher, [(x, y)], schedule, s_opt, t_opt, on_step=record)
    assert [h["phase"] for h in history] == ["self-studying"] * 3 + ["co-studying"] * 3 + [
        "tutoring"
    ] * 3
    before = [p.detach().clone() for p in copy.deepcopy(teacher).parameters()]
    changed = [
        not all(torch.equal(a, b) for a, b in zip(snapshots[i][1], snapshots[i - 1][1]))
        for i in range(1, 9)
    ]
    assert changed == [False, False, True, True, True, False, False, False]
    assert all("teacher_loss" in h for h in history[3:6])
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_qkd_schedule_validation():
    with pytest.raises(ValueError, match="co_studying_steps must be >= 0"):
        QKDSchedule(1, -1, 1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        QKDSchedule(1, 1, 1, temperature=0)
