"""Translators that ship with qdistill, stored small and rebuilt as ordinary OpenNMT-py
checkpoints.

A shipped translator is a folder: ``model.safetensors`` (the weights in fp16, half the bytes of
fp32; the BLEU this costs is measured and written in ``card.json``), ``checkpoint.json`` (what
else an OpenNMT-py checkpoint holds: its options and vocabularies), the sentencepiece models
``spm.{src,tgt}.model``, OpenNMT's vocabulary files ``vocab.{src,tgt}`` (which a student trained
on the same pieces needs) and ``card.json`` (where it came from and what it scores).
:func:`write_checkpoint` turns the folder back into the ``teacher.pt`` a user would have: fp32
weights, loadable by the stock ``onmt_translate``.

    python -m onmt_plugin.pretrained export CHECKPOINT.pt FOLDER   # what recipes/pretrained does
    python -m onmt_plugin.pretrained checkpoint FOLDER -o teacher.pt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from compressor.format.files import (
    WRITTEN_BY,
    CheckpointError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    check_output,
    load_checkpoint,
    written_by,
)

SHIPPED = Path(__file__).resolve().parent / "pretrained"
MULTI30K_DE_EN = SHIPPED / "multi30k_de_en_lstm"
WEIGHTS = "model.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
CARD = "card.json"
SIDE_FILES = ("spm.src.model", "spm.tgt.model", "vocab.src", "vocab.tgt")
_SET_OPTIONS = ("_all_transform",)  # OpenNMT keeps these options as sets
COMMAND = "onmt_plugin.pretrained"


def export(checkpoint_path: str | os.PathLike, folder: str | os.PathLike, side_dir: Path) -> Path:
    """Store an fp32 OpenNMT-py checkpoint (no optimizer needed) as a shipped folder; the
    sentencepiece models and vocabularies are copied from ``side_dir``."""
    from safetensors.torch import save

    checkpoint = load_checkpoint(checkpoint_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in checkpoint["model"].items()}
    tensors |= {f"generator.{k}": v for k, v in checkpoint["generator"].items()}
    halved = {k: v.to(torch.float16).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(folder / WEIGHTS, save(halved, metadata={"format": "onmt-fp16"}))
    options = {k: sorted(v) if k in _SET_OPTIONS else v for k, v in vars(checkpoint["opt"]).items()}
    atomic_write_json(folder / CHECKPOINT_JSON, {"opt": options, "vocab": checkpoint["vocab"]})
    for name in SIDE_FILES:
        atomic_write_bytes(folder / name, (side_dir / name).read_bytes())
    return folder


def load(folder: str | os.PathLike = MULTI30K_DE_EN) -> dict:
    """The shipped translator as an OpenNMT-py checkpoint dict, weights in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [n for n in (WEIGHTS, CHECKPOINT_JSON, *SIDE_FILES) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a shipped translator: it lacks {missing[0]}")
    try:
        tensors = load_file(folder / WEIGHTS)
        meta = json.loads((folder / CHECKPOINT_JSON).read_text(encoding="utf-8"))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{folder}: unreadable shipped translator ({exc})") from None
    options = {k: set(v) if k in _SET_OPTIONS else v for k, v in meta["opt"].items()}
    parts: dict[str, dict] = {"model": {}, "generator": {}}
    for name, value in tensors.items():
        part, key = name.split(".", 1)
        parts[part][key] = value.to(torch.float32)
    return {**parts, "vocab": meta["vocab"], "opt": argparse.Namespace(**options)}


def card(folder: str | os.PathLike = MULTI30K_DE_EN) -> dict:
    """Where the shipped translator came from and what it scores (``card.json``)."""
    return json.loads((Path(folder) / CARD).read_text(encoding="utf-8"))


def write_checkpoint(
    folder: str | os.PathLike, output: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write the shipped translator in ``folder`` as an fp32 OpenNMT-py checkpoint, and copy
    its sentencepiece models and vocabularies beside it (``spm.src.model`` ...), as a user's
    own trained model would come."""
    output = Path(output)
    check_output(
        output,
        inputs=[Path(folder) / WEIGHTS],
        force=force,
        ours=lambda p: written_by(p) == COMMAND,
    )
    atomic_save({**load(folder), WRITTEN_BY: COMMAND}, output)
    for name in SIDE_FILES:
        target = output.parent / name
        if not target.exists():
            shutil.copyfile(Path(folder) / name, target)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="store a checkpoint as a shipped folder (fp16)")
    exp.add_argument("checkpoint")
    exp.add_argument("folder")
    exp.add_argument("--side-dir", help="folder of spm.*.model and vocab.* (default: beside)")
    ckpt = sub.add_parser("checkpoint", help="rebuild the fp32 OpenNMT-py checkpoint")
    ckpt.add_argument("folder", nargs="?", default=str(MULTI30K_DE_EN))
    ckpt.add_argument("-o", "--output", required=True)
    ckpt.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            side = Path(args.side_dir or Path(args.checkpoint).parent)
            print(export(args.checkpoint, args.folder, side))
        else:
            print(write_checkpoint(args.folder, args.output, force=args.force))
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"pretrained: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
