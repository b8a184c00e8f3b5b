"""Bit allocation (Polino et al. 2018): more quantization points where the loss is sensitive.

A tensor's importance is the norm of its mean gradient over a few batches. The budget is what
the codes cost on disk: ``bits`` per quantized weight, summed over the tensors. Every tensor
keeps at least ``bits - 1`` bits; the rest of the budget goes one bit (a doubling of the
points) at a time to the tensor whose points fall furthest short of a share proportional to
its importance, among those whose extra bit still fits. Point counts are powers of two, so no
code bit is paid for and left unused, and a "4-bit" allocation packs to no more than 4 bits a
weight.

The paper's own rule shares a budget of points instead (``unit="points"``): every tensor keeps
half of its ``2**bits`` points and the rest goes in proportion to importance, so counts need
not be powers of two and the codes of a "4-bit" allocation can take 5 bits a weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.quantization.grids import MAX_BITS
from compressor.surgery.config import QuantConfig
from compressor.surgery.selection import full_name, model_candidates, select


def _selected_weights(
    model: nn.Module, config: QuantConfig
) -> dict[int, tuple[str, nn.Module, str]]:
    """The weights ``config`` would quantize, each once (tied weights share an id)."""
    selected: dict[int, tuple[str, nn.Module, str]] = {}
    modules = dict(model.named_modules())
    for module_name, tensor_names in select(model_candidates(model), config):
        module = modules[module_name]
        for tensor_name in tensor_names:
            selected.setdefault(
                id(getattr(module, tensor_name)), (module_name, module, tensor_name)
            )
    return selected


def weight_sizes(model: nn.Module, config: QuantConfig = QuantConfig()) -> dict[str, int]:
    """Number of elements of each weight ``config`` would quantize."""
    return {
        full_name(module_name, tensor_name): getattr(module, tensor_name).numel()
        for module_name, module, tensor_name in _selected_weights(model, config).values()
    }


def weight_importance(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor],
    config: QuantConfig = QuantConfig(),
    num_batches: int = 4,
) -> dict[str, float]:
    """Norm of the mean gradient of each weight ``config`` would quantize, over
    ``num_batches`` batches; ``loss_fn(model, inputs, target)`` returns a scalar loss."""
    selected = _selected_weights(model, config)
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    for inputs, target in batches:
        if seen == num_batches:
            break
        model.zero_grad(set_to_none=True)
        loss_fn(model, inputs, target).backward()
        for key, (_, module, tensor_name) in selected.items():
            grad = getattr(module, tensor_name).grad
            if grad is not None:
                sums[key] = sums.get(key, 0) + grad.detach().clone()
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("bit allocation needs at least one batch")
    return {
        full_name(module_name, tensor_name): float(torch.linalg.vector_norm(sums[key] / seen))
        if key in sums
        else 0.0
        for key, (module_name, _, tensor_name) in selected.items()
    }


UNITS = ("bits", "points")


def share_points(
    importance: dict[str, float],
    sizes: dict[str, int],
    bits: int,
    budget: int | None = None,
    unit: str = "bits",
) -> dict[str, int]:
    """Point counts for each tensor of ``importance`` (``sizes``: its number of weights).

    ``unit="bits"``: powers of two whose codes take at most ``budget`` bits (default: ``bits``
    per weight); see the module docstring. ``unit="points"``: the paper's rule, ``budget``
    points in all (default: ``2**bits`` per tensor), each tensor keeping ``2**(bits-1)`` and
    the rest shared in proportion to importance; the counts add up to the budget exactly but
    need not be powers of two, and a count just above a power of two pays a whole extra code bit.
    """
    if not importance:
        raise ValueError("bit allocation needs at least one tensor to quantize (empty budget)")
    if set(sizes) != set(importance):
        raise ValueError(
            f"sizes and importance name different tensors: {sorted(set(sizes) ^ set(importance))}"
        )
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be from 1 to {MAX_BITS}, got {bits}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    names = sorted(importance)
    weights = {n: max(float(importance[n]), 0.0) for n in names}
    if not any(weights.values()):  # no signal: spread the budget evenly
        weights = dict.fromkeys(names, 1.0)
    if unit == "points":
        return _share_points_by_count(names, weights, bits, budget)
    return _share_code_bits(names, weights, sizes, bits, budget)


def _share_code_bits(
    names: list[str],
    weights: dict[str, float],
    sizes: dict[str, int],
    bits: int,
    budget: int | None,
) -> dict[str, int]:
    floor = max(1, bits - 1)
    total = sum(sizes.values())
    budget = bits * total if budget is None else budget
    spent = floor * total
    if budget < spent:
        raise ValueError(
            f"a budget of {budget} bits is below the minimum of {floor} a weight "
            f"({spent} bits for {total} weights)"
        )
    if budget > MAX_BITS * total:
        raise ValueError(f"a budget of {budget} bits exceeds {MAX_BITS} a weight")
    width = dict.fromkeys(names, floor)
    while True:
        fits = [n for n in names if width[n] < MAX_BITS and spent + sizes[n] <= budget]
        if not fits:
            break
        # Furthest below a share proportional to importance; ties go to the smaller tensor.
        best = max(fits, key=lambda n: (weights[n] / 2 ** width[n], -sizes[n]))
        width[best] += 1
        spent += sizes[best]
    return {n: 2 ** width[n] for n in names}


def _share_points_by_count(
    names: list[str], weights: dict[str, float], bits: int, budget: int | None
) -> dict[str, int]:
    floor = max(1, 2 ** (bits - 1))
    cap = 2**MAX_BITS
    budget = len(names) * 2**bits if budget is None else budget
    if budget < floor * len(names):
        raise ValueError(
            f"a budget of {budget} points is below the minimum of {floor} for each of "
            f"{len(names)} tensors"
        )
    if budget > cap * len(names):
        raise ValueError(f"a budget of {budget} points exceeds {cap} for each of {len(names)}")
    counts = np.full(len(names), floor, dtype=np.int64)
    share_of = np.array([weights[n] for n in names], dtype=np.float64)
    remaining = budget - int(counts.sum())
    while remaining > 0:
        open_ = counts < cap
        w = np.where(open_, share_of, 0.0)
        if w.sum() == 0:
            w = open_.astype(np.float64)
        share = w / w.sum() * remaining
        extra = np.minimum(np.floor(share).astype(np.int64), cap - counts)
        counts += extra
        left = remaining - int(extra.sum())
        if left > 0 and int(extra.sum()) == 0:  # hand out the last points by largest remainder
            for i in np.argsort(-(share - np.floor(share)), kind="stable"):
                if left == 0:
                    break
                if counts[i] < cap:
                    counts[i] += 1
                    left -= 1
        remaining = budget - int(counts.sum())
    return {n: int(c) for n, c in zip(names, counts)}


def allocate_bits(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor],
    bits: int,
    config: QuantConfig = QuantConfig(),
    budget: int | None = None,
    unit: str = "bits",
    num_batches: int = 4,
) -> dict[str, int]:
    """Per-tensor point counts for ``QuantConfig(method="nonuniform"|"differentiable",
    num_points=...)``: importance from gradients, shared as :func:`share_points` says."""
    importance = weight_importance(model, batches, loss_fn, config, num_batches)
    return share_points(importance, weight_sizes(model, config), bits, budget, unit)


def effective_bits(num_points: dict[str, int]) -> dict[str, float]:
    """``log2`` of each tensor's point count: its bit width (fractional for ``unit="points"``)."""
    return {name: math.log2(count) for name, count in num_points.items()}
