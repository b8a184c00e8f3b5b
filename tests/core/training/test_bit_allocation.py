"""Bit allocation: importance from gradients, the budget shared and conserved."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compressor
from compressor import save_packed
from compressor.format.packed import load_packed, packed_info
from compressor.quantization.grids import MAX_BITS
from compressor.training.bit_allocation import (
    allocate_bits,
    effective_bits,
    share_points,
    weight_importance,
)


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


@settings(max_examples=80, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(st.floats(0, 1e3, allow_nan=False), st.integers(1, 5000)),
        min_size=1,
        max_size=8,
    ),
    bits=st.integers(1, 6),
    slack=st.floats(0, 1),
)
def test_budget_respected_floor_kept_and_nothing_left_that_fits(tensors, bits, slack):
    importance = {f"t{i}.weight": v for i, (v, _) in enumerate(tensors)}
    sizes = {f"t{i}.weight": n for i, (_, n) in enumerate(tensors)}
    floor = max(1, bits - 1)
    total = sum(sizes.values())
    budget = floor * total + int(slack * (MAX_BITS - floor) * total)
    counts = share_points(importance, sizes, bits, budget)
    width = {n: int(math.log2(c)) for n, c in counts.items()}
    assert all(c == 2 ** width[n] for n, c in counts.items())  # powers of two
    spent = sum(sizes[n] * width[n] for n in counts)
    assert spent <= budget
    assert all(floor <= w <= MAX_BITS for w in width.values())
    # Greedy to the end: no tensor below the cap could take one more bit.
    assert all(w == MAX_BITS or spent + sizes[n] > budget for n, w in width.items())


@settings(max_examples=60, deadline=None)
@given(importance=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=2, max_size=8))
def test_equal_sizes_more_important_never_gets_fewer_bits(importance):
    names = {f"t{i}.weight": v for i, v in enumerate(importance)}
    counts = share_points(names, dict.fromkeys(names, 100), bits=3)
    ordered = sorted(names, key=names.get)
    for low, high in zip(ordered, ordered[1:]):
        if names[high] > names[low]:
            assert counts[high] >= counts[low]


def test_default_budget_is_bits_per_weight_and_follows_importance():
    importance = {"a.weight": 1.0, "b.weight": 3.0, "c.weight": 0.0}
    sizes = {"a.weight": 200, "b.weight": 100, "c.weight": 100}
    counts = share_points(importance, sizes, bits=4)
    # 1,600 bits: 3 a weight (1,200), then b twice (b has 3x a's importance), then a once.
    assert effective_bits(counts) == {"a.weight": 4.0, "b.weight": 5.0, "c.weight": 3.0}
    assert sum(sizes[n] * math.log2(c) for n, c in counts.items()) == 4 * 400
    # No signal at all: every tensor gets the nominal width.
    flat = share_points(dict.fromkeys(sizes, 0.0), sizes, bits=4)
    assert flat == dict.fromkeys(sizes, 16)


@settings(max_examples=60, deadline=None)
@given(
    importance=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=8),
    bits=st.integers(1, 6),
    extra=st.integers(0, 200),
)
def test_paper_rule_conserves_points_keeps_half_and_is_monotone(importance, bits, extra):
    names = {f"t{i}.weight": v for i, v in enumerate(importance)}
    floor = 2 ** (bits - 1)
    budget = min(len(names) * floor + extra, len(names) * 256)
    counts = share_points(names, dict.fromkeys(names, 100), bits, budget, unit="points")
    assert sum(counts.values()) == budget
    assert all(floor <= c <= 256 for c in counts.values())
    ordered = sorted(names, key=names.get)
    for low, high in zip(ordered, ordered[1:]):
        if names[high] > names[low] and counts[low] < 256:
            assert counts[high] >= counts[low] - 1  # largest remainders: at most one apart


def test_paper_rule_default_budget_and_fractional_bits():
    importance = {"a.weight": 3.0, "b.weight": 1.0, "c.weight": 0.0}
    counts = share_points(importance, dict.fromkeys(importance, 100), bits=4, unit="points")
    assert counts == {"a.weight": 8 + 18, "b.weight": 8 + 6, "c.weight": 8}
    assert effective_bits(counts)["a.weight"] == pytest.approx(math.log2(26))


def test_allocation_packs_to_no_more_than_its_bits(tmp_path):
    model, data = _model(), _batches()
    counts = allocate_bits(model, data, _loss, bits=2)
    assert set(counts) == {"0.weight", "3.weight"}
    sizes = compressor.weight_sizes(model)
    assert sizes == {"0.weight": 8 * 3 * 3 * 3, "3.weight": 5 * 8 * 6 * 6}
    for method in ("nonuniform", "differentiable"):
        quantized = _model()
        compressor.quantize_(
            quantized, compressor.QuantConfig(bits=2, method=method, num_points=counts)
        )
        specs = compressor.quantization_specs(quantized)
        assert {n: s.num_levels for n, s in specs.items()} == counts
        expected = compressor.quantized_state_dict(quantized)
        save_packed(quantized, tmp_path / f"{method}.qd")
        infos = [i for i in packed_info(tmp_path / f"{method}.qd") if i.spec is not None]
        code_bits = sum(i.code_bits * math.prod(i.shape) for i in infos)
        assert 0 < code_bits <= 2 * sum(sizes.values())
        loaded, _ = load_packed(tmp_path / f"{method}.qd")
        for name, value in expected.items():
            assert torch.equal(loaded[name], value), name


def test_bad_budgets_raise():
    one = {"a.weight": 1.0}
    with pytest.raises(ValueError, match="empty budget"):
        share_points({}, {}, bits=4)
    with pytest.raises(ValueError, match="name different tensors"):
        share_points(one, {"b.weight": 10}, bits=4)
    with pytest.raises(ValueError, match="below the minimum"):
        share_points(one, {"a.weight": 10}, bits=4, budget=29)
    with pytest.raises(ValueError, match="exceeds"):
        share_points(one, {"a.weight": 10}, bits=4, budget=81)
    with pytest.raises(ValueError, match="bits must be"):
        share_points(one, {"a.weight": 10}, bits=0)
    with pytest.raises(ValueError, match="unit must be one of"):
        share_points(one, {"a.weight": 10}, bits=4, unit="bytes")
    two = {"a.weight": 1.0, "b.weight": 1.0}
    with pytest.raises(ValueError, match="below the minimum of 8 for each of 2"):
        share_points(two, dict.fromkeys(two, 10), bits=4, budget=15, unit="points")
    with pytest.raises(ValueError, match="exceeds 256"):
        share_points(one, {"a.weight": 10}, bits=4, budget=257, unit="points")
    with pytest.raises(ValueError, match="at least one batch"):
        allocate_bits(_model(), [], _loss, bits=2)
    with pytest.raises(ValueError, match="no quantizable layer"):
        allocate_bits(nn.Sequential(nn.ReLU()), _batches(1), lambda m, x, y: x.sum(), bits=2)
