"""Which weights are quantized: one rule for models and for state dicts.

A model's quantizable weights come from a registry of module types (:func:`register_weights`
adds your own); a bare state dict's are its layer weights by name and shape. Either way
:func:`select` applies ``QuantConfig``'s ``include``/``exclude``/``keep_first_last`` over
module names, so ``quantize_(model, config)`` and ``quantize_state_dict(state, config)``
quantize the same tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from compressor.surgery.config import QuantConfig

WeightNames = Callable[[nn.Module], list[str]]
_REGISTRY: dict[type, WeightNames] = {}
_RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)(_l\d+)?(_reverse)?$")


def register_weights(module_type: type, weights: WeightNames) -> None:
    """Declare which of a module type's own parameters are quantized: ``weights(module)``
    returns their names. Subclasses inherit the entry of their closest registered base."""
    _REGISTRY[module_type] = weights


def quantizable_weights(module: nn.Module) -> list[str]:
    """Names of the weights of ``module`` that quantization applies to (its own, not
    children's): the registry entry of its closest registered class."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return [n for n in _REGISTRY[cls](module) if getattr(module, n, None) is not None]
    return []


def _weight(_: nn.Module) -> list[str]:
    return ["weight"]


def _recurrent(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False) if _RNN_WEIGHT.match(n)]


def _attention(module: nn.Module) -> list[str]:
    # One packed input projection, or separate q/k/v ones when key and value sizes differ;
    # out_proj is an nn.Linear child of its own.
    if getattr(module, "in_proj_weight", None) is not None:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


for _type in (
    nn.Linear,
    nn.Embedding,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
):
    register_weights(_type, _weight)
for _type in (nn.LSTM, nn.GRU, nn.RNN):
    register_weights(_type, _recurrent)
for _type in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
    register_weights(_type, lambda _: ["weight_ih", "weight_hh"])
register_weights(nn.MultiheadAttention, _attention)


def is_layer_weight(name: str, value: torch.Tensor) -> bool:
    """The rule for a bare state dict: a floating-point tensor of two or more dimensions named
    ``weight``, ``*_weight`` or ``weight_*`` (recurrent weights). Biases, norms, buffers such
    as position encodings, and anything else stay in full precision."""
    leaf = name.rsplit(".", 1)[-1]
    named = leaf == "weight" or leaf.endswith("_weight") or bool(_RNN_WEIGHT.match(leaf))
    return named and value.is_floating_point() and value.dim() >= 2


Candidates = list[tuple[str, list[str]]]


def model_candidates(model: nn.Module) -> Candidates:
    """``(module name, [its quantizable tensor names])`` in module order."""
    return [(n, quantizable_weights(m)) for n, m in model.named_modules() if quantizable_weights(m)]


def state_candidates(state: Mapping[str, torch.Tensor]) -> Candidates:
    """The layer weights of a state dict grouped by module name, in state-dict order."""
    groups: dict[str, list[str]] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and is_layer_weight(name, value):
            module, _, leaf = name.rpartition(".")
            groups.setdefault(module, []).append(leaf)
    return list(groups.items())


def select(candidates: Candidates, config: QuantConfig) -> Candidates:
    """The candidates that ``config`` quantizes: ``include`` (each regex must match a
    module), minus ``exclude``, minus the first and last module with ``keep_first_last``."""
    if not candidates:
        raise ValueError(
            "nothing to quantize: no quantizable layer (Linear, Conv, Embedding, attention, "
            "recurrent; in a state dict, a floating-point weight of two or more dimensions)"
        )
    names = [n or "<top level>" for n, _ in candidates]
    if config.include is not None:
        for pattern in config.include:
            if not any(re.search(pattern, n) for n, _ in candidates):
                more = " ..." if len(names) > 12 else ""
                raise ValueError(
                    f"include: regex {pattern!r} matches no quantizable module; "
                    f"the quantizable modules are {names[:12]}{more}"
                )
        candidates = [(n, t) for n, t in candidates if any(re.search(p, n) for p in config.include)]
    candidates = [(n, t) for n, t in candidates if not any(re.search(p, n) for p in config.exclude)]
    if config.keep_first_last and candidates:
        first, last = candidates[0][0], candidates[-1][0]
        candidates = [(n, t) for n, t in candidates if n not in (first, last)]
    return candidates


def full_name(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name
