"""The end of training: the packed file, and the quantized weights kept in place."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from compressor.format.packed import write_packed
from compressor.quantization.record import QuantSpec
from compressor.surgery.quantize import materialize_, packable_state


def save_packed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    specs: Mapping[str, QuantSpec] | None = None,
    entropy: str | None = None,
    shadow: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Write a packed model file; returns its size in bytes.

    ``model_or_state_dict`` is a quantized model (parametrized: codes come from the shadow
    weights; or materialized: values are re-encoded and verified bit for bit) or a state dict
    with ``specs`` (and optionally the ``shadow`` weights its values came from). The other
    arguments are those of :func:`compressor.format.packed.write_packed`."""
    if isinstance(model_or_state_dict, nn.Module):
        tensors, found, codes = packable_state(model_or_state_dict)
        return write_packed(
            tensors, path, metadata, {**found, **(specs or {})}, entropy, codes=codes
        )
    if not isinstance(model_or_state_dict, Mapping):
        raise TypeError(
            f"save_packed takes a model or a state dict, got {type(model_or_state_dict).__name__}"
        )
    return write_packed(model_or_state_dict, path, metadata, specs, entropy, shadow)


def pack_and_materialize_(
    student: nn.Module,
    packed_path: str | os.PathLike | None = None,
    entropy: str | None = None,
    metadata: dict | None = None,
) -> nn.Module:
    """The final quantization of Algorithm 1: optionally write the packed file (encoded from
    the shadow weights, exactly what the student computes with), then materialize the
    quantized weights in place."""
    student.eval()
    if packed_path is not None:
        save_packed(student, packed_path, metadata=metadata, entropy=entropy)
    return materialize_(student)


finish_ = pack_and_materialize_
"""The earlier name of :func:`pack_and_materialize_`."""
