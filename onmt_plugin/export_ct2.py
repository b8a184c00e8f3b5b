"""``qdistill onmt-export-ct2``: a transformer student (checkpoint or packed file) as a
CTranslate2 model directory, the deployment path most OpenNMT-py users already have.

CTranslate2's own converter does the work. We feed it a clean copy of the checkpoint: loaded
with the ``weights_only`` allowlist (never the converter's unsafe-pickle switch), decoded first
when it is a packed file, without the optimizer or our shadow weights, and with the attention
option that OpenNMT-py 3.5 writes by default (``scaled-dot-flash``, which on the CPU and for
fp32 computes exactly what ``scaled-dot`` does) spelled the way the converter accepts. With the
default ``--quantization float32`` the exported weights are the student's quantized values bit
for bit; ``int8`` and friends requantize them with CTranslate2's own per-row scheme.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.cli import UsageError
from compressor.format.files import (
    atomic_directory,
    atomic_save,
    check_output_dir,
    write_export_marker,
)

QUANTIZATIONS = (
    "float32",
    "int8",
    "int8_float32",
    "int16",
    "float16",
    "bfloat16",
    "int8_float16",
    "int8_bfloat16",
)
_ONMT_KEYS = ("model", "generator", "vocab", "opt")
_SAME_ATTENTION = {"scaled-dot-flash": "scaled-dot"}


def load_onmt_checkpoint(path: Path) -> dict:
    """An OpenNMT-py checkpoint from a ``.pt`` file or a packed file, loaded safely."""
    from compressor.format.files import CheckpointError, load_checkpoint
    from compressor.format.packed import PackedFormatError, is_packed
    from onmt_plugin import packing

    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        checkpoint = packing.load(path) if is_packed(path) else load_checkpoint(path)
    except (CheckpointError, PackedFormatError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in _ONMT_KEYS):
        raise UsageError(f"{path}: not an OpenNMT-py checkpoint (no model/generator/vocab/opt)")
    return checkpoint


def converter_input(checkpoint: dict, source: Path) -> dict:
    """What CTranslate2's converter reads: model, generator, vocabulary and options only."""
    opt = argparse.Namespace(**vars(checkpoint["opt"]))
    kinds = {opt.encoder_type, opt.decoder_type}
    if kinds != {"transformer"}:
        kind = "/".join(sorted(kinds))
        raise UsageError(
            f"{source}: CTranslate2 converts transformer models only, this one is {kind}; "
            "deploy it with onmt_translate and the packed file (`qdistill pack`) instead"
        )
    for flag in ("copy_attn", "lambda_align"):
        if getattr(opt, flag, 0):
            raise UsageError(f"{source}: CTranslate2's converter does not support -{flag}")
    attention = getattr(opt, "self_attn_type", "scaled-dot")
    opt.self_attn_type = _SAME_ATTENTION.get(attention, attention)
    return {key: checkpoint[key] for key in ("model", "generator", "vocab")} | {"opt": opt}


def export(
    source: Path, output_dir: Path, quantization: str = "float32", force: bool = False
) -> Path:
    """Convert ``source`` into the CTranslate2 model directory ``output_dir``.

    The directory appears complete or not at all: it is written under a temporary name beside
    the target and renamed. An existing ``output_dir`` is replaced only with ``force`` and only
    when it is an earlier export of ours that holds nothing else (a marker file lists what we
    wrote), never one that contains the source or the working directory. Raises
    :class:`UsageError` or :class:`compressor.format.files.OutputError` for what the user
    can fix."""
    import torch

    try:
        from ctranslate2.converters import OpenNMTPyConverter
    except ImportError:
        raise UsageError("CTranslate2 is not installed: pip install 'qdistill[onmt]'") from None
    check_output_dir(output_dir, [source], force=force)
    clean = converter_input(load_onmt_checkpoint(source), source)
    with atomic_directory(output_dir) as staging:
        checkpoint = staging.parent / f"{staging.name}.checkpoint.pt"
        try:
            atomic_save(clean, checkpoint)
            converter = OpenNMTPyConverter(str(checkpoint))  # loads with weights_only=True
            # Our copy holds only tensors, lists and the options' argparse.Namespace.
            with torch.serialization.safe_globals([argparse.Namespace]):
                converter.convert(str(staging), quantization=quantization, force=True)
        except (ValueError, NotImplementedError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"{source}: CTranslate2 cannot convert it: {first}") from None
        finally:
            checkpoint.unlink(missing_ok=True)
        write_export_marker(
            staging, command="onmt-export-ct2", source=str(source), quantization=quantization
        )
    return output_dir


def directory_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _export(args: argparse.Namespace) -> int:
    source, output = Path(args.checkpoint), Path(args.output)
    export(source, output, args.quantization, args.force)
    size = directory_bytes(output)
    print(
        f"wrote {output}: CTranslate2 model, {args.quantization} weights, {size:,} bytes; "
        f"translate with ctranslate2.Translator({str(output)!r})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "onmt-export-ct2",
        help="convert a transformer student (checkpoint or packed file) to CTranslate2",
        description="Convert an OpenNMT-py transformer checkpoint or packed file into a "
        "CTranslate2 model directory. float32 keeps the student's quantized weights exactly.",
    )
    p.add_argument("checkpoint", help="OpenNMT-py checkpoint (.pt) or packed file (.qd)")
    p.add_argument("-o", "--output", required=True, help="CTranslate2 model directory to write")
    p.add_argument(
        "--quantization",
        default="float32",
        choices=QUANTIZATIONS,
        help="CTranslate2 weight type (default: float32, exact)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT if it is an earlier export of this command (nothing else)",
    )
    p.set_defaults(func=_export)
