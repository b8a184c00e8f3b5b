"""``qdistill onmt-quantize``: post-training ("post-mortem") quantization of any OpenNMT-py
checkpoint, the paper's PM baseline. The output is an ordinary OpenNMT checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.cli import UsageError
from compressor.cli.flags import add_quantization_flags

COMMAND = "onmt-quantize"


def _quantize(args: argparse.Namespace) -> int:
    import compressor
    from compressor.cli.flags import quant_config
    from compressor.format.files import (
        WRITTEN_BY,
        atomic_save,
        check_output,
        load_checkpoint,
        written_by,
    )
    from onmt_plugin.checkpoint import split_generator

    source = Path(args.checkpoint)
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    config = quant_config(args)
    out = check_output(
        args.output,
        [source],
        force=args.force,
        ours=lambda p: written_by(p) == COMMAND,
        what=f"qdistill {COMMAND}",
    )
    checkpoint = load_checkpoint(source)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "opt" not in checkpoint:
        raise UsageError(f"{source}: not an OpenNMT-py checkpoint (no 'model'/'opt')")
    state = {
        **checkpoint["model"],
        **{f"generator.{k}": v for k, v in (checkpoint.get("generator") or {}).items()},
    }
    # The core's rule for a bare state dict: the weights of linear, embedding, attention and
    # recurrent layers (weight, weight_ih_l0, ...); not norms, biases or position encodings.
    try:
        state, record = compressor.quantize_state_dict(state, config)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    checkpoint["model"], checkpoint["generator"] = split_generator(state)
    checkpoint["qdistill"] = {**record.to_dict(), "post_training": True}
    checkpoint.pop("optim", None)  # a quantized copy is for translation, not for resuming
    checkpoint[WRITTEN_BY] = COMMAND
    atomic_save(checkpoint, out)
    print(f"wrote {out}: {len(record.specs)} weight tensors quantized to {args.bits} bits")
    return 0


def register_quantize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        COMMAND, help="post-training quantization of an OpenNMT-py checkpoint"
    )
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    add_quantization_flags(p)
    p.add_argument(
        "--force", action="store_true", help=f"replace OUTPUT if an earlier {COMMAND} wrote it"
    )
    p.set_defaults(func=_quantize)
