"""OpenNMT-py checkpoints as packed files.

``qdistill pack student.pt -o student.qd`` stores the model and generator tensors (quantized
ones as codes) together with the vocabulary and the options the model was built with, so the
packed file is a complete model: with the plugin installed every OpenNMT-py tool that loads a
checkpoint (``onmt_translate -model student.qd``) loads it, and ``qdistill unpack`` gives back
an ordinary checkpoint. Registered in the ``qdistill.checkpoint_formats`` entry-point group.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping

import torch

from onmt_plugin.checkpoint import split_generator

_KEYS = ("model", "generator", "vocab", "opt")
_SET = "__set__"


def from_checkpoint(checkpoint: Mapping) -> tuple[dict, dict] | None:
    """The tensors and JSON metadata of an OpenNMT-py checkpoint; None for anything else."""
    if not all(key in checkpoint for key in _KEYS):
        return None
    if not isinstance(checkpoint["opt"], argparse.Namespace):
        return None
    state = {
        **checkpoint["model"],
        **{f"generator.{k}": v for k, v in checkpoint["generator"].items()},
    }
    options = {k: _to_json(v) for k, v in vars(checkpoint["opt"]).items()}
    try:
        json.dumps(options)
        json.dumps(checkpoint["vocab"])
    except TypeError as exc:
        raise ValueError(f"OpenNMT-py options or vocabulary not JSON-serialisable: {exc}") from None
    return state, {"onmt": {"vocab": checkpoint["vocab"], "opt": options}}


def _to_json(value: object) -> object:
    # OpenNMT keeps a few options as sets (``_all_transform``); JSON has no sets.
    return {_SET: sorted(value, key=str)} if isinstance(value, (set, frozenset)) else value


def _from_json(value: object) -> object:
    return set(value[_SET]) if isinstance(value, dict) and list(value) == [_SET] else value


def to_checkpoint(state: Mapping[str, torch.Tensor], metadata: Mapping) -> dict:
    """The OpenNMT-py checkpoint a packed file holds (without optimizer state)."""
    onmt = metadata.get("onmt")
    if not isinstance(onmt, Mapping) or not isinstance(onmt.get("opt"), Mapping):
        raise ValueError("the packed file holds no OpenNMT-py options and vocabulary")
    model, generator = split_generator(dict(state))
    return {
        "model": model,
        "generator": generator,
        "vocab": onmt["vocab"],
        "opt": argparse.Namespace(**{k: _from_json(v) for k, v in onmt["opt"].items()}),
        "optim": None,
    }


def load(path: str | os.PathLike) -> dict:
    """An OpenNMT-py checkpoint from a packed file; ``ValueError`` says what is wrong."""
    from compressor.format.packed import load_packed

    state, metadata = load_packed(path)
    if metadata.get("checkpoint_format") != "onmt":
        raise ValueError(
            f"{path} is a packed file but not of an OpenNMT-py model; "
            "pack the OpenNMT-py checkpoint itself with `qdistill pack CHECKPOINT.pt`"
        )
    return to_checkpoint(state, metadata)
