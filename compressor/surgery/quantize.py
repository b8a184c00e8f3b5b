"""`quantize_` and `materialize_`: put quantization on a model's weights, and take it off."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.quantization.grids import BucketCodes
from compressor.quantization.record import QuantRecord, QuantSpec
from compressor.surgery.config import QuantConfig
from compressor.surgery.quantizers import UniformQuantizer, WeightQuantizer, make_weight_quantizer
from compressor.surgery.selection import full_name, model_candidates, select, state_candidates

RECORD_ATTR = "quantization_record"
"""The attribute where :func:`materialize_` leaves the model's :class:`QuantRecord`."""


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
    modules = dict(model.named_modules())
    for module_name, tensor_names in select(model_candidates(model), config):
        module = modules[module_name]
        bits = config.bits_for(module_name)
        for tensor_name in tensor_names:
            weight = getattr(module, tensor_name)
            quantizer = shared.get(id(weight))
            if quantizer is None:
                quantizer = make_weight_quantizer(
                    config.method,
                    weight,
                    bits,
                    config.bucket_size,
                    config.rounding,
                    config.num_points.get(full_name(module_name, tensor_name)),
                    config.point_init,
                    config.grid,
                )
                shared[id(weight)] = quantizer.to(weight.device)
            parametrize.register_parametrization(module, tensor_name, quantizer, unsafe=True)
        quantized_modules.append((module_name, module))
    if config.act_bits is not None:
        from compressor.surgery.activations import insert_activation_quantizers

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
                yield full_name(module_name, tensor_name), module, tensor_name, quantizer


def quantization_record(model: nn.Module) -> QuantRecord:
    """How each quantized weight is stored, by plain name: read from the quantizers of a
    quantized model (with the codes of grids that do not re-encode from their values), merged
    over the record that :func:`materialize_` left in ``model.quantization_record``."""
    specs, codes = {}, {}
    with torch.no_grad():
        for name, module, tensor_name, quantizer in quantized_tensors(model):
            specs[name] = quantizer.spec
            if not isinstance(quantizer, UniformQuantizer):
                codes[name] = quantizer.encode(module.parametrizations[tensor_name].original)
    earlier = getattr(model, RECORD_ATTR, None)
    current = QuantRecord(specs, codes)
    return earlier.merged(current) if isinstance(earlier, QuantRecord) else current


def quantization_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """``quantization_record(model).specs``: the spec of each quantized weight."""
    return dict(quantization_record(model).specs)


def _plain_key(key: str) -> str | None:
    """``a.parametrizations.weight.original`` -> ``a.weight``; quantizer state -> None."""
    if ".parametrizations." not in f".{key}":
        return key
    head, _, rest = f".{key}".partition(".parametrizations.")
    tensor_name, _, leaf = rest.partition(".")
    if leaf != "original":
        return None
    return full_name(head[1:], tensor_name)


@torch.no_grad()
def quantized_state_from_training(
    state: Mapping[str, torch.Tensor], record: QuantRecord
) -> dict[str, torch.Tensor]:
    """A training checkpoint's state dict (parametrized names, shadow weights) as the plain,
    quantized state dict its model computes with: each recorded tensor decoded from its
    codes when the record keeps them (learned grids), else quantized from its shadow weight
    on its recorded grid (exact: the quantizers compute the same)."""
    plain = {}
    for key, value in state.items():
        name = _plain_key(key)
        if name is not None:
            plain[name] = value
    for name, spec in record.specs.items():
        if name not in plain:
            raise KeyError(f"the state dict has no weight {name!r}, which the record names")
        shadow = plain[name]
        codes = record.codes.get(name)
        plain[name] = (
            spec.decode(codes, shadow.shape, shadow.dtype)
            if codes is not None
            else spec.quantize(shadow)
        )
    return plain


@torch.no_grad()
def shadow_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under plain names with the full-precision shadow weights (for resuming);
    an OrderedDict with the ``_metadata`` module versions of the plain model, as
    ``model.state_dict()`` gives them (some modules' ``load_state_dict`` needs them)."""
    state = model.state_dict()
    out = OrderedDict()
    for key, value in state.items():
        plain = _plain_key(key)
        if plain is not None:
            out[plain] = value
    versions = getattr(state, "_metadata", None)
    if versions is not None:  # the quantizers' own modules are no part of the plain model
        out._metadata = type(versions)(
            (k, v) for k, v in versions.items() if ".parametrizations." not in f".{k}."
        )
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

    What was quantized, and how, stays in ``model.quantization_record`` (a
    :class:`QuantRecord`, also returned by :func:`quantization_record`), which
    :func:`compressor.save_packed` reads."""
    entries = list(quantized_tensors(model))
    record = quantization_record(model)  # codes of grids that do not re-encode from values
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
    setattr(model, RECORD_ATTR, record)
    return model


def packable_state(
    model: nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantSpec], dict[str, BucketCodes]]:
    """What a packed file stores of ``model``: its quantized state dict under plain names, the
    spec of each quantized tensor, and the codes its quantizers give (encoded from the shadow
    weights, or kept by :func:`materialize_`)."""
    record = quantization_record(model)
    codes = dict(record.codes)
    with torch.no_grad():  # uniform codes too: encoded from the value the model computes with
        for name, module, tensor_name, quantizer in quantized_tensors(model):
            codes[name] = quantizer.encode(module.parametrizations[tensor_name].original)
    return quantized_state_dict(model), dict(record.specs), codes


@torch.no_grad()
def quantize_state_dict(
    state: Mapping[str, torch.Tensor], config: QuantConfig, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], QuantRecord]:
    """Post-training quantization of a checkpoint: the state with the selected weights replaced
    by their quantized values, and the record of how. The selection is :func:`quantize_`'s:
    with ``model`` (the architecture the state loads into), by module type; without, by the
    state's layer weights (:func:`compressor.surgery.selection.is_layer_weight`). Learned
    grids (``differentiable``, ``lsq``) need training: use ``quantize_`` for them."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.method not in ("uniform", "nonuniform"):
        raise ValueError(
            f"method {config.method!r} learns its grid in training; post-training quantization "
            "takes method='uniform' or 'nonuniform'"
        )
    candidates = model_candidates(model) if model is not None else state_candidates(state)
    out, specs, codes = OrderedDict(state), {}, {}
    if hasattr(state, "_metadata"):  # module versions, which load_state_dict may need
        out._metadata = state._metadata
    done: dict[tuple, str] = {}  # tied tensors (one storage) are quantized once and stay tied
    for module_name, tensor_names in select(candidates, config):
        bits = config.bits_for(module_name)
        for tensor_name in tensor_names:
            name = full_name(module_name, tensor_name)
            if name not in state:
                raise KeyError(f"the state dict has no {name!r}, which the model quantizes")
            value = state[name]
            storage = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape)
            if value.numel() and storage in done:
                specs[name], out[name] = specs[done[storage]], out[done[storage]]
                if done[storage] in codes:
                    codes[name] = codes[done[storage]]
                continue
            done[storage] = name
            count = config.num_points.get(name, 2**bits)
            quantizer = make_weight_quantizer(
                config.method,
                value,
                bits,
                config.bucket_size,
                "nearest",
                count,
                config.point_init,
                config.grid,
            )
            spec = specs[name] = quantizer.spec
            if spec.reencodes:
                out[name] = spec.quantize(value)
            else:  # keep the codes: the quantized values alone do not give them back
                codes[name] = spec.encode(value)
                out[name] = spec.decode(codes[name], value.shape, value.dtype)
    return out, QuantRecord(specs, codes)


def quantize_once() -> AbstractContextManager:
    """Quantize each weight once per forward pass, for modules that read their weights several
    times (nn.LSTM): ``with compressor.quantize_once(): loss = model(x) ...``."""
    return parametrize.cached()


cached = quantize_once
"""The earlier name of :func:`quantize_once`."""
