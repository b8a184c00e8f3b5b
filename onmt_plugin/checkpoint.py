"""Student checkpoints that stock OpenNMT-py tools read as ordinary models."""

from __future__ import annotations

import os

import torch
from torch import nn

import compressor
from compressor.format.files import atomic_save, load_checkpoint


def split_generator(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """OpenNMT keeps the generator's weights apart from the model's."""
    model = {k: v for k, v in state.items() if not k.startswith("generator.")}
    generator = {k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")}
    return model, generator


def qdistill_record(model: nn.Module) -> dict:
    """What the checkpoint carries beyond the quantized values: the core's
    :class:`compressor.QuantRecord` (each tensor's spec, and the codes of learned grids), and
    what a resume needs: shadow weights, quantizer state (learned points), the settings."""
    quantizer_state = {
        k: v
        for k, v in model.state_dict().items()
        if ".parametrizations." in k and not k.endswith(".original")
    }
    state = model.__dict__.get("_qdistill")
    return {
        **compressor.quantization_record(model).to_dict(),  # the core's versioned record
        "shadow": compressor.shadow_state_dict(model),
        "quantizer_state": quantizer_state,
        "settings": state.settings.to_dict() if state is not None else None,
    }


def quantized_checkpoint(checkpoint: dict, model: nn.Module) -> dict:
    """The checkpoint OpenNMT built for a student, with the parametrized state replaced by the
    quantized values under the plain names and the shadow weights under
    ``checkpoint["qdistill"]``."""
    checkpoint = dict(checkpoint)
    checkpoint["model"], checkpoint["generator"] = split_generator(
        compressor.quantized_state_dict(model)
    )
    checkpoint["qdistill"] = qdistill_record(model)
    return checkpoint


def rewrite_checkpoint(path: str | os.PathLike, model: nn.Module) -> None:
    """Rewrite a student's checkpoint that OpenNMT saved with the parametrized state (see
    :func:`quantized_checkpoint`); atomically: a kill leaves the old file or the new one."""
    atomic_save(quantized_checkpoint(load_checkpoint(path), model), path)
