"""OpenNMT-py checkpoints as packed files.

``qdistill pack student.pt -o student.qd`` stores the model and generator tensors (quantized
ones as codes) together with the vocabulary and the options the model was built with, so the
packed file is a complete model: with the plugin installed every OpenNMT-py tool that loads a
checkpoint (``onmt_translate -model student.qd``) loads it, and ``qdistill unpack`` gives back
an ordinary checkpoint. Registered in the ``qdistill.checkpoint_formats`` entry-point group.

A transformer's sinusoidal position encodings (the ``pe`` buffers, ``max_len x d_model`` fp32
on each side: 10 MB in all at d_model 256, more than a 4-bit student's weights) are not stored:
OpenNMT-py's ``PositionalEncoding`` constructor recreates them from the model options, so
:func:`rebuilt_at_load` lists those that this rebuild reproduces bit for bit when packing, and
:func:`rebuild` recreates them when loading. A buffer the rebuild does not reproduce exactly
(another OpenNMT-py version, say) is stored as before: nothing changes silently.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Mapping

import torch

from onmt_plugin.checkpoint import split_generator

_KEYS = ("model", "generator", "vocab", "opt")
_SET = "__set__"
# ``Embeddings`` registers its PositionalEncoding as ``make_embedding.pe``, whose buffer is ``pe``.
_POSITION_ENCODING = "embeddings.make_embedding.pe.pe"
_VOCAB_SIDE = {"encoder": "src", "decoder": "tgt"}
REBUILT_WHY = (
    "sinusoidal position encoding: OpenNMT-py's PositionalEncoding rebuilds it from the model "
    "options at load (checked bit-exact when packed)"
)


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


def _options(metadata: Mapping) -> argparse.Namespace:
    """The model options a packed file (or :func:`from_checkpoint`'s metadata) records."""
    onmt = metadata.get("onmt")
    if not isinstance(onmt, Mapping) or not isinstance(onmt.get("opt"), Mapping):
        raise ValueError("the packed file holds no OpenNMT-py options and vocabulary")
    return argparse.Namespace(**{k: _from_json(v) for k, v in onmt["opt"].items()})


def _position_encoding(name: str, opt: argparse.Namespace) -> torch.Tensor | None:
    """The ``pe`` buffer that OpenNMT-py's constructor builds for ``name`` from the options,
    exactly as ``onmt.modules.Embeddings`` does; None if ``name`` is no such buffer or the
    options do not build one."""
    side, _, rest = name.partition(".")
    if rest != _POSITION_ENCODING or side not in _VOCAB_SIDE:
        return None
    if not getattr(opt, "position_encoding", False):
        return None
    dim = getattr(opt, f"{_VOCAB_SIDE[side]}_word_vec_size", None)
    kind = getattr(opt, "position_encoding_type", "SinusoidalInterleaved")
    with warnings.catch_warnings():  # onmt.modules warns about torch.cuda.amp on import
        warnings.simplefilter("ignore", FutureWarning)
        from onmt.modules.embeddings import PositionalEncoding
    try:
        return PositionalEncoding(dim, kind).pe
    except (TypeError, ValueError):  # an odd or missing size, an unknown encoding type
        return None


def rebuilt_at_load(state: Mapping[str, torch.Tensor], metadata: Mapping) -> dict[str, str]:
    """``{name: why}`` for the tensors of ``state`` (from :func:`from_checkpoint`) that need not
    be stored: the position encodings that :func:`rebuild` recreates bit for bit."""
    opt = _options(metadata)
    found = {}
    for name, value in state.items():
        rebuilt = _position_encoding(name, opt)
        if (
            rebuilt is not None
            and isinstance(value, torch.Tensor)
            and rebuilt.dtype == value.dtype
            and torch.equal(rebuilt, value)
        ):
            found[name] = REBUILT_WHY
    return found


def rebuild(state: Mapping[str, torch.Tensor], metadata: Mapping) -> dict[str, torch.Tensor]:
    """``state`` with the placeholders of the tensors left out of a packed file (``meta``
    tensors) replaced by their rebuilt values; ``ValueError`` if one cannot be rebuilt."""
    opt = _options(metadata)
    out = dict(state)
    for name, value in state.items():
        if not value.is_meta:
            continue
        rebuilt = _position_encoding(name, opt)
        if rebuilt is None or rebuilt.shape != value.shape or rebuilt.dtype != value.dtype:
            got = "nothing" if rebuilt is None else f"{list(rebuilt.shape)} {rebuilt.dtype}"
            raise ValueError(
                f"{name} was left out of the file to be rebuilt at load, but the model options "
                f"rebuild {got} for it, not {list(value.shape)} {value.dtype}"
            )
        out[name] = rebuilt
    return out


def to_checkpoint(state: Mapping[str, torch.Tensor], metadata: Mapping) -> dict:
    """The OpenNMT-py checkpoint a packed file holds (without optimizer state), with the
    tensors left out of the file rebuilt."""
    opt = _options(metadata)
    model, generator = split_generator(rebuild(state, metadata))
    return {
        "model": model,
        "generator": generator,
        "vocab": metadata["onmt"]["vocab"],
        "opt": opt,
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
