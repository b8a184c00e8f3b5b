"""Bit allocation (Polino et al. 2018): more quantization points where the loss is sensitive.

A tensor's importance is the norm of its mean gradient over a few batches. The budget is what
the codes cost on disk: ``bits`` per quantized weight, summed over the tensors. Every tensor
keeps at least ``bits - 1`` bits; the rest of the budget goes one bit (a doubling of the
points) at a time to the tensor whose points fall furthest short of a share proportional to
its importance, among those whose extra bit still fits. Point counts are powers of two, so no
code bit is paid for and left unused, and a "4-bit" allocation packs to no more than 4 bits a
weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compressor.api import _select_modules, quantizable_weights
from compressor.config import QuantConfig
from compressor.quantizers import MAX_BITS


def _full_name(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def _selected_weights(
    model: nn.Module, config: QuantConfig
) -> dict[int, tuple[str, nn.Module, str]]:
    """The weights ``config`` would quantize, each once (tied weights share an id)."""
    selected: dict[int, tuple[str, nn.Module, str]] = {}
    for module_name, module in _select_modules(model, config):
        for tensor_name in quantizable_weights(module):
            selected.setdefault(
                id(getattr(module, tensor_name)), (module_name, module, tensor_name)
            )
    return selected


def weight_sizes(model: nn.Module, config: QuantConfig = QuantConfig()) -> dict[str, int]:
    """Number of elements of each weight ``config`` would quantize."""
    return {
        _full_name(module_name, tensor_name): getattr(module, tensor_name).numel()
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
        _full_name(module_name, tensor_name): float(torch.linalg.vector_norm(sums[key] / seen))
        if key in sums
        else 0.0
        for key, (module_name, _, tensor_name) in selected.items()
    }


def share_points(
    importance: dict[str, float],
    sizes: dict[str, int],
    bits: int,
    total_bits: int | None = None,
) -> dict[str, int]:
    """Point counts (powers of two) whose codes take at most ``total_bits`` (default:
    ``bits`` per weight of ``sizes``); see the module docstring for the rule."""
    if not importance:
        raise ValueError("bit allocation needs at least one tensor to quantize (empty budget)")
    if set(sizes) != set(importance):
        raise ValueError(
            f"sizes and importance name different tensors: {sorted(set(sizes) ^ set(importance))}"
        )
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be from 1 to {MAX_BITS}, got {bits}")
    names = sorted(importance)
    floor = max(1, bits - 1)
    budget = bits * sum(sizes.values()) if total_bits is None else total_bits
    spent = floor * sum(sizes.values())
    if budget < spent:
        raise ValueError(
            f"a budget of {budget} bits is below the minimum of {floor} a weight "
            f"({spent} bits for {sum(sizes.values())} weights)"
        )
    if budget > MAX_BITS * sum(sizes.values()):
        raise ValueError(f"a budget of {budget} bits exceeds {MAX_BITS} a weight")
    weights = {n: max(float(importance[n]), 0.0) for n in names}
    if not any(weights.values()):  # no signal: spread the bits evenly
        weights = dict.fromkeys(names, 1.0)
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


def allocate_bits(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor],
    bits: int,
    config: QuantConfig = QuantConfig(),
    total_bits: int | None = None,
    num_batches: int = 4,
) -> dict[str, int]:
    """Per-tensor point counts for ``QuantConfig(method="nonuniform"|"differentiable",
    num_points=...)``, from the paper's heuristic (see module docstring)."""
    importance = weight_importance(model, batches, loss_fn, config, num_batches)
    return share_points(importance, weight_sizes(model, config), bits, total_bits)


def effective_bits(num_points: dict[str, int]) -> dict[str, float]:
    """``log2`` of each tensor's point count: its bit width."""
    return {name: math.log2(count) for name, count in num_points.items()}
