"""Loading PyTorch checkpoints without running pickled code."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file that is not a checkpoint loadable with ``weights_only=True``."""


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with ``argparse.Namespace``
    allow-listed: OpenNMT-py and torchvision's references pickle their arguments into every
    checkpoint, and torch >= 2.6 refuses them otherwise. Anything else pickled is refused."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    if not os.path.isfile(path):
        raise CheckpointError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint that loads safely (weights_only): {first}"
        ) from None
