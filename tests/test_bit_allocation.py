"""Bit allocation: importance from gradients, the budget shared and conserved."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compressor
from compressor.bit_allocation import (
    allocate_bits,
    effective_bits,
    share_points,
    weight_importance,
)
from compressor.packed import load_packed, save_packed


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )


def _batches(n=6):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 5, (16,), generator=gen))
        for _ in range(n)
    ]


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def test_importance_is_norm_of_mean_gradient():
    model, data = _model(), _batches()
    got = weight_importance(model, data, _loss, num_batches=3)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind
    grads = {"0.weight": 0, "3.weight": 0}
    for x, y in data[:3]:
        model.zero_grad()
        _loss(model, x, y).backward()
        grads["0.weight"] = grads["0.weight"] + model[0].weight.grad
        grads["3.weight"] = grads["3.weight"] + model[3].weight.grad
    for name, total in grads.items():
        assert got[name] == pytest.approx(float((total / 3).norm()), rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    importance=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=8),
    bits=st.integers(1, 6),
    extra=st.integers(0, 200),
)
def test_budget_conserved_floor_kept_and_monotone(importance, bits, extra):
    names = {f"t{i}.weight": v for i, v in enumerate(importance)}
    floor = 2 ** (bits - 1)
    budget = min(len(names) * floor + extra, len(names) * 256)
    counts = share_points(names, bits, budget)
    assert sum(counts.values()) == budget
    assert all(floor <= c <= 256 for c in counts.values())
    ordered = sorted(names, key=names.get)
    for low, high in zip(ordered, ordered[1:]):
        if names[high] > names[low] and counts[low] < 256:
            assert counts[high] >= counts[low] - 1  # largest remainders: at most one apart


def test_default_budget_is_two_to_the_bits_per_tensor_and_bits_are_fractional():
    counts = share_points({"a.weight": 3.0, "b.weight": 1.0, "c.weight": 0.0}, bits=4)
    assert sum(counts.values()) == 3 * 16
    assert counts == {"a.weight": 8 + 18, "b.weight": 8 + 6, "c.weight": 8}
    bits = effective_bits(counts)
    assert bits["a.weight"] == pytest.approx(math.log2(26))
    assert bits["c.weight"] == 3.0


def test_allocation_feeds_quantize_and_the_packed_format(tmp_path):
    model, data = _model(), _batches()
    counts = allocate_bits(model, data, _loss, bits=2, total_points=11)
    assert sum(counts.values()) == 11 and set(counts) == {"0.weight", "3.weight"}
    assert all(c >= 2 for c in counts.values())
    for method in ("nonuniform", "differentiable"):
        quantized = _model()
        compressor.quantize_(
            quantized, compressor.QuantConfig(bits=2, method=method, num_points=counts)
        )
        specs = compressor.quantization_specs(quantized)
        assert {n: s.num_levels for n, s in specs.items()} == counts
        expected = compressor.quantized_state_dict(quantized)
        save_packed(quantized, tmp_path / f"{method}.qd")
        loaded, _ = load_packed(tmp_path / f"{method}.qd")
        for name, value in expected.items():
            assert torch.equal(loaded[name], value), name


def test_bad_budgets_raise():
    with pytest.raises(ValueError, match="empty budget"):
        share_points({}, bits=4)
    with pytest.raises(ValueError, match="below the minimum"):
        share_points({"a.weight": 1.0, "b.weight": 1.0}, bits=4, total_points=15)
    with pytest.raises(ValueError, match="exceeds"):
        share_points({"a.weight": 1.0}, bits=4, total_points=257)
    with pytest.raises(ValueError, match="bits must be"):
        share_points({"a.weight": 1.0}, bits=0)
    with pytest.raises(ValueError, match="at least one batch"):
        allocate_bits(_model(), [], _loss, bits=2)
    with pytest.raises(ValueError, match="no quantizable layer"):
        allocate_bits(nn.Sequential(nn.ReLU()), _batches(1), lambda m, x, y: x.sum(), bits=2)
