"""Bit allocation (Polino et al. 2018): more quantization points where the loss is sensitive.

A tensor's importance is the norm of its mean gradient over a few batches. Every tensor keeps
at least half of its ``2**bits`` points; the rest of a fixed total budget of points is shared
in proportion to importance. Point counts need not be powers of two, so a tensor's effective
bit width ``log2(points)`` can be fractional.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.api import _select_modules, quantizable_weights
from compressor.config import QuantConfig
from compressor.quantizers import MAX_BITS


def _full_name(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def weight_importance(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor],
    config: QuantConfig = QuantConfig(),
    num_batches: int = 4,
) -> dict[str, float]:
    """Norm of the mean gradient of each weight ``config`` would quantize, over
    ``num_batches`` batches; ``loss_fn(model, inputs, target)`` returns a scalar loss."""
    selected = {}
    for module_name, module in _select_modules(model, config):
        for tensor_name in quantizable_weights(module):
            selected.setdefault(
                id(getattr(module, tensor_name)), (module_name, module, tensor_name)
            )
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
        _full_name(module_name, tensor_name): float(torch.linalg.vector_norm(sums[key] / seen))
        if key in sums
        else 0.0
        for key, (module_name, _, tensor_name) in selected.items()
    }


def share_points(
    importance: dict[str, float], bits: int, total_points: int | None = None
) -> dict[str, int]:
    """Split ``total_points`` (default: ``2**bits`` per tensor) between tensors: each gets
    ``2**(bits-1)``, the remainder goes in proportion to importance (largest remainders,
    at most ``2**MAX_BITS`` points a tensor). The counts add up to the budget exactly."""
    if not importance:
        raise ValueError("bit allocation needs at least one tensor to quantize (empty budget)")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be from 1 to {MAX_BITS}, got {bits}")
    names = sorted(importance)
    floor = max(1, 2 ** (bits - 1))
    cap = 2**MAX_BITS
    budget = len(names) * 2**bits if total_points is None else total_points
    if budget < floor * len(names):
        raise ValueError(
            f"a budget of {budget} points is below the minimum of {floor} for each of "
            f"{len(names)} tensors"
        )
    if budget > cap * len(names):
        raise ValueError(f"a budget of {budget} points exceeds {cap} for each of {len(names)}")
    counts = np.full(len(names), floor, dtype=np.int64)
    weights = np.array([max(importance[n], 0.0) for n in names], dtype=np.float64)
    remaining = budget - counts.sum()
    while remaining > 0:
        open_ = counts < cap
        w = np.where(open_, weights, 0.0)
        if w.sum() == 0:
            w = open_.astype(np.float64)
        share = w / w.sum() * remaining
        extra = np.minimum(np.floor(share).astype(np.int64), cap - counts)
        counts += extra
        left = remaining - int(extra.sum())
        if left > 0 and int(extra.sum()) == 0:  # hand out the last points by largest remainder
            order = np.argsort(-(share - np.floor(share)), kind="stable")
            for i in order:
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
    total_points: int | None = None,
    num_batches: int = 4,
) -> dict[str, int]:
    """Per-tensor point counts for ``QuantConfig(method="nonuniform"|"differentiable",
    num_points=...)``, from the paper's heuristic (see module docstring)."""
    importance = weight_importance(model, batches, loss_fn, config, num_batches)
    return share_points(importance, bits, total_points)


def effective_bits(num_points: dict[str, int]) -> dict[str, float]:
    """``log2`` of each tensor's point count: its fractional bit width."""
    return {name: math.log2(count) for name, count in num_points.items()}
