"""`quantize_` and `materialize_`: put quantization on a model's weights, and take it off."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.config import QuantConfig
from compressor.parametrizations import UniformQuantizer, WeightQuantizer, make_weight_quantizer
from compressor.spec import QuantSpec

# Module types whose weights are quantized, and the names of those weights.
_WEIGHT_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)
_RNN_MODULES = (nn.LSTM, nn.GRU, nn.RNN)
_CELL_MODULES = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")

# Where materialize_ leaves the specs of the tensors it quantized (name -> QuantSpec).
_SPECS_ATTR = "_qdistill_specs"
_CODES_ATTR = "_qdistill_codes"


def quantizable_weights(module: nn.Module) -> list[str]:
    """Names of the weights of ``module`` that quantization applies to (its own, not children's)."""
    if isinstance(module, _WEIGHT_MODULES):
        return ["weight"]
    if isinstance(module, _RNN_MODULES):
        return [n for n, _ in module.named_parameters(recurse=False) if _RNN_WEIGHT.match(n)]
    if isinstance(module, _CELL_MODULES):
        return ["weight_ih", "weight_hh"]
    return []


def _full_name(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def _select_modules(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    candidates = [(n, m) for n, m in model.named_modules() if quantizable_weights(m)]
    if not candidates:
        raise ValueError(
            "the model has no quantizable layer (Linear, Conv, Embedding, LSTM/GRU/RNN and cells)"
        )
    names = [n for n, _ in candidates]
    if config.include is not None:
        for pattern in config.include:
            if not any(re.search(pattern, n) for n in names):
                raise ValueError(
                    f"include: regex {pattern!r} matches no quantizable module; "
                    f"the quantizable modules are {names[:12]}{' ...' if len(names) > 12 else ''}"
                )
        candidates = [(n, m) for n, m in candidates if any(re.search(p, n) for p in config.include)]
    candidates = [(n, m) for n, m in candidates if not any(re.search(p, n) for p in config.exclude)]
    if config.keep_first_last and candidates:
        first, last = candidates[0][0], candidates[-1][0]
        candidates = [(n, m) for n, m in candidates if n not in (first, last)]
    return candidates


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize the weights of ``model`` in place, as ``config`` selects; returns ``model``.

    The weights become parametrized: each original parameter is kept as the full-precision
    shadow weight that the optimizer updates, and every read of ``module.weight`` returns its
    quantized value (gradients pass straight through). Weights shared between modules stay
    shared and are quantized once. Biases and normalisation layers stay in full precision.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if any(True for _ in quantized_tensors(model)):
        raise ValueError("the model is already quantized; call materialize_(model) first")
    shared: dict[int, WeightQuantizer] = {}
    quantized_modules = []
    for module_name, module in _select_modules(model, config):
        bits = config.bits_for(module_name)
        for tensor_name in quantizable_weights(module):
            weight = getattr(module, tensor_name)
            quantizer = shared.get(id(weight))
            if quantizer is None:
                quantizer = make_weight_quantizer(
                    config.method,
                    weight,
                    bits,
                    config.bucket_size,
                    config.rounding,
                    config.num_points.get(_full_name(module_name, tensor_name)),
                    config.point_init,
                )
                shared[id(weight)] = quantizer.to(weight.device)
            parametrize.register_parametrization(module, tensor_name, quantizer, unsafe=True)
        quantized_modules.append((module_name, module))
    if config.act_bits is not None:
        from compressor.activations import insert_activation_quantizers

        insert_activation_quantizers(quantized_modules, config.act_bits)
    return model


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, WeightQuantizer]]:
    """Every quantized weight: (plain name such as ``"fc.weight"``, module, tensor name,
    quantizer). A weight shared by several modules is listed under each name."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            quantizer = plist[0]
            if isinstance(quantizer, WeightQuantizer):
                yield _full_name(module_name, tensor_name), module, tensor_name, quantizer


def quantization_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """How each quantized weight is stored, by plain name: read from the parametrizations, or
    recorded by :func:`materialize_` once they are gone."""
    specs = {name: q.spec for name, _, _, q in quantized_tensors(model)}
    return specs or dict(getattr(model, _SPECS_ATTR, {}))


def _plain_key(key: str) -> str | None:
    """``a.parametrizations.weight.original`` -> ``a.weight``; quantizer state -> None."""
    if ".parametrizations." not in f".{key}":
        return key
    head, _, rest = f".{key}".partition(".parametrizations.")
    tensor_name, _, leaf = rest.partition(".")
    if leaf != "original":
        return None
    return _full_name(head[1:], tensor_name)


@torch.no_grad()
def shadow_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under plain names with the full-precision shadow weights (for resuming)."""
    out = {}
    for key, value in model.state_dict().items():
        plain = _plain_key(key)
        if plain is not None:
            out[plain] = value
    return out


@torch.no_grad()
def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under plain names with the quantized weights, as a model without any
    qdistill code expects it; it loads into the unquantized architecture."""
    out = shadow_state_dict(model)
    was_training = model.training
    model.eval()
    try:
        shared: dict[int, torch.Tensor] = {}  # tied weights come back as one tensor
        for name, module, tensor_name, quantizer in quantized_tensors(model):
            if name in out:
                if id(quantizer) not in shared:
                    shared[id(quantizer)] = getattr(module, tensor_name).detach().clone()
                out[name] = shared[id(quantizer)]
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def load_shadow_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load plain-named full-precision weights into a quantized (parametrized) model.

    Tensors are copied into the model's parameters and buffers directly, so this works for
    models that override ``load_state_dict`` (OpenNMT-py's NMTModel does).
    """
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    routed = {}
    for key in model.state_dict():
        plain = _plain_key(key)
        if plain is not None and plain in state_dict and key in targets:
            routed[key] = state_dict[plain]
    missing = [k for k in targets if _plain_key(k) is not None and k not in routed]
    if strict and missing:
        raise KeyError(f"state dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    copy_into_(model, routed)


@torch.no_grad()
def copy_into_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the parameters and buffers of those (state-dict) names."""
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, value in state.items():
        if key not in targets:
            raise KeyError(f"the model has no parameter or buffer {key!r}")
        targets[key].copy_(value)


def materialize_(model: nn.Module) -> nn.Module:
    """Remove the quantization parametrizations, leaving plain parameters that hold exactly the
    quantized values; ``quantize_`` then ``materialize_`` is post-training quantization.

    The specs of the quantized tensors stay readable through :func:`quantization_specs`.
    """
    entries = list(quantized_tensors(model))
    specs = {name: quantizer.spec for name, _, _, quantizer in entries}
    # Only min-max uniform values re-encode exactly from themselves: keep the codes of the
    # others (non-uniform points, learned steps) so that the materialized model still packs.
    with torch.no_grad():
        codes = {
            name: quantizer.encode(module.parametrizations[tensor_name].original)
            for name, module, tensor_name, quantizer in entries
            if not isinstance(quantizer, UniformQuantizer)
        }
    was_training = model.training
    model.eval()  # stochastic rounding is for training steps; the final weights round to nearest
    done: set[int] = set()
    try:
        for _, module, tensor_name, quantizer in entries:
            first = id(quantizer) not in done
            # The first removal writes the quantized values into the shared original parameter;
            # modules tied to it then simply point at that parameter again.
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=first)
            done.add(id(quantizer))
    finally:
        model.train(was_training)
    setattr(model, _SPECS_ATTR, {**getattr(model, _SPECS_ATTR, {}), **specs})
    setattr(model, _CODES_ATTR, {**getattr(model, _CODES_ATTR, {}), **codes})
    return model


def materialized_codes(model: nn.Module) -> dict:
    """Codes of the tensors that :func:`materialize_` quantized on grids other than the
    min-max uniform one, by plain name."""
    return dict(getattr(model, _CODES_ATTR, {}))


def cached() -> AbstractContextManager:
    """Quantize each weight once per forward pass, for modules that read their weights several
    times (nn.LSTM): ``with compressor.cached(): loss = model(x) ...``."""
    return parametrize.cached()
