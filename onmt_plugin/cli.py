"""``qdistill onmt-quantize``: post-training ("post-mortem") quantization of any OpenNMT-py
checkpoint, the paper's PM baseline. The output is an ordinary OpenNMT checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.cli import UsageError

COMMAND = "onmt-quantize"


def _quantize(args: argparse.Namespace) -> int:
    import compressor
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
    if not 1 <= args.bits <= 8:
        raise UsageError(f"--bits must be from 1 to 8, got {args.bits}")
    if args.bucket_size <= 0:
        raise UsageError(
            f"--bucket-size must be a positive number of weights, got {args.bucket_size}"
        )
    out = check_output(
        args.output, [source], force=args.force, ours=lambda p: written_by(p) == COMMAND,
        what=f"qdistill {COMMAND}",
    )  # fmt: skip
    checkpoint = load_checkpoint(source)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "opt" not in checkpoint:
        raise UsageError(f"{source}: not an OpenNMT-py checkpoint (no 'model'/'opt')")
    state = {
        **checkpoint["model"],
        **{f"generator.{k}": v for k, v in (checkpoint.get("generator") or {}).items()},
    }
    specs = {}
    for name, value in state.items():
        # Weights of linear, embedding and recurrent layers (weight, weight_ih_l0, ...); not
        # position encodings or other buffers.
        if (
            value.is_floating_point()
            and value.dim() >= 2
            and name.split(".")[-1].startswith("weight")
        ):
            spec = compressor.QuantSpec("uniform", args.bits, args.bucket_size)
            state[name] = spec.quantize(value)
            specs[name] = spec.to_dict()
    checkpoint["model"], checkpoint["generator"] = split_generator(state)
    checkpoint["qdistill"] = {"specs": specs, "post_training": True, "format": 1}
    checkpoint.pop("optim", None)  # a quantized copy is for translation, not for resuming
    checkpoint[WRITTEN_BY] = COMMAND
    atomic_save(checkpoint, out)
    print(f"wrote {out}: {len(specs)} weight tensors quantized to {args.bits} bits")
    return 0


def register_quantize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        COMMAND, help="post-training quantization of an OpenNMT-py checkpoint"
    )
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--bucket-size", type=int, default=256)
    p.add_argument(
        "--force", action="store_true", help=f"replace OUTPUT if an earlier {COMMAND} wrote it"
    )
    p.set_defaults(func=_quantize)
