"""Shrink the depth of OpenNMT-py checkpoints (LSTM and transformer): keep selected encoder and
decoder layers, renumber their state-dict keys and update the options, so that the result loads
in the stock ``onmt_translate`` and serves as ``-train_from``. The optimizer state is dropped
(its tensors belong to the removed layers too), so training from the result starts a fresh
optimizer. Narrower hidden sizes are not offered: cutting rows out of LSTM gates and attention
heads has no sound choice of which units to keep.
"""

from __future__ import annotations

import argparse
import copy
import os
import re

from compressor.format.files import (
    WRITTEN_BY,
    atomic_save,
    check_output,
    load_checkpoint,
    written_by,
)
from recipes.shrink_vision import select_indices

# (side, regex with the layer index as group "k"); first match wins.
LAYER_PATTERNS = [
    ("enc", re.compile(r"^(encoder\.transformer\.)(?P<k>\d+)(\..*)$")),
    ("enc", re.compile(r"^(encoder\.rnn\.(?:weight|bias)_(?:ih|hh|hr)_l)(?P<k>\d+)(.*)$")),
    ("dec", re.compile(r"^(decoder\.transformer_layers\.)(?P<k>\d+)(\..*)$")),
    ("dec", re.compile(r"^(decoder\.rnn\.layers\.)(?P<k>\d+)(\..*)$")),
    ("dec", re.compile(r"^(decoder\.rnn\.(?:weight|bias)_(?:ih|hh|hr)_l)(?P<k>\d+)(.*)$")),
]


def load_onmt_checkpoint(path: str | os.PathLike) -> dict:
    """An OpenNMT-py checkpoint, loaded by the one safe loader
    (:func:`compressor.format.files.load_checkpoint`, which raises ``CheckpointError`` for a file
    that is not a checkpoint) and checked to hold a model and its options."""
    checkpoint = load_checkpoint(path)
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("model"), dict)
        or "opt" not in checkpoint
    ):
        raise ValueError(f"{path} is not an OpenNMT-py checkpoint (no 'model' and 'opt')")
    if not isinstance(checkpoint["opt"], argparse.Namespace):
        raise ValueError(f"{path}: its 'opt' is not OpenNMT-py's options (an argparse.Namespace)")
    return checkpoint


def _layer_count(state: dict, side: str) -> int:
    found = set()
    for key in state:
        for s, pattern in LAYER_PATTERNS:
            match = pattern.match(key)
            if match and s == side:
                found.add(int(match["k"]))
                break
    return max(found) + 1 if found else 0


def shrink_onmt_checkpoint(
    checkpoint: dict,
    enc_layers: int | None = None,
    dec_layers: int | None = None,
    enc_select: str = "first",
    dec_select: str = "first",
) -> tuple[dict, dict]:
    """Return ``(new_checkpoint, summary)``; ``None`` keeps a side as it is."""
    state = checkpoint["model"]
    kept = {}
    for side, wanted, select in (("enc", enc_layers, enc_select), ("dec", dec_layers, dec_select)):
        count = _layer_count(state, side)
        if wanted is None:
            kept[side] = list(range(count))
            continue
        if count == 0:
            raise ValueError(f"the checkpoint has no {side}oder layers to shrink")
        kept[side] = select_indices(count, int(wanted), select)
    new_state = {}
    for key, value in state.items():
        for side, pattern in LAYER_PATTERNS:
            match = pattern.match(key)
            if match:
                k = int(match["k"])
                if k in kept[side]:
                    new_key = f"{match[1]}{kept[side].index(k)}{match[3]}"
                    new_state[new_key] = value
                break
        else:
            new_state[key] = value
    # The first layer of an RNN reads the embeddings: its input size must still fit.
    for key, value in new_state.items():
        teacher_value = state.get(key)
        if teacher_value is not None and teacher_value.shape != value.shape:
            raise ValueError(
                f"{key} would change shape {tuple(teacher_value.shape)} -> {tuple(value.shape)}; "
                "keep layer 0 (it reads the embeddings) in the selection"
            )
    opt = copy.deepcopy(checkpoint["opt"])
    opt.enc_layers = len(kept["enc"])
    opt.dec_layers = len(kept["dec"])
    if hasattr(opt, "layers") and getattr(opt, "layers", -1) not in (-1, None):
        opt.layers = -1  # per-side values above take over
    result = {k: v for k, v in checkpoint.items() if k != "optim"}
    result["model"] = new_state
    result["opt"] = opt
    summary = {
        "encoder_layers": [_layer_count(state, "enc"), len(kept["enc"])],
        "decoder_layers": [_layer_count(state, "dec"), len(kept["dec"])],
        "encoder_kept": kept["enc"],
        "decoder_kept": kept["dec"],
        "optimizer": "dropped (train_from starts a fresh optimizer)",
    }
    return result, summary


def shrink_onmt_file(
    src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False, **kwargs
) -> dict:
    """Shrink the checkpoint at ``src`` into ``dst`` (written atomically, marked as a
    ``qdistill shrink`` output); returns the summary. ``dst`` is checked before any work by
    :func:`compressor.format.files.check_output`: never ``src`` itself, and an existing file
    only with
    ``force`` and only if an earlier shrink wrote it."""
    from recipes.shrink_vision import SHRINK

    dst = check_output(
        dst, [src], force=force, ours=lambda p: written_by(p) == SHRINK, what="qdistill shrink"
    )
    result, summary = shrink_onmt_checkpoint(load_onmt_checkpoint(src), **kwargs)
    result[WRITTEN_BY] = SHRINK
    atomic_save(result, dst)
    return summary
