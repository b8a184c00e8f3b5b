"""The quantization flags that every post-training command takes (``qdistill pack``,
``qdistill onmt-quantize``), turned into one :class:`compressor.QuantConfig`."""

from __future__ import annotations

import argparse

from compressor.cli import UsageError
from compressor.surgery.config import QuantConfig


def add_quantization_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization")
    group.add_argument("--bits", type=int, default=4, help="bits per weight (default 4)")
    group.add_argument(
        "--bucket-size", type=int, default=256, help="weights sharing one scale (default 256)"
    )
    group.add_argument("--method", choices=("uniform", "nonuniform"), default="uniform")
    group.add_argument(
        "--grid",
        choices=("minmax", "int4_kernel"),
        default="minmax",
        help="int4_kernel: the grid of PyTorch's int4 matmul kernel (bf16 scale and zero per "
        "bucket), so that the model can run on that kernel; needs --bits 4 and --bucket-size "
        "32/64/128/256 (default: minmax)",
    )
    group.add_argument(
        "--include",
        action="append",
        help="regex over module names to quantize (repeatable; default: every layer weight)",
    )
    group.add_argument(
        "--exclude", action="append", default=[], help="regex over module names to keep fp32"
    )
    group.add_argument(
        "--keep-first-last", action="store_true", help="keep the first and last layer in fp32"
    )


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The config the flags describe; a bad value is a one-line :class:`UsageError`."""
    if args.bucket_size is not None and args.bucket_size <= 0:
        raise UsageError(
            f"--bucket-size must be a positive number of weights, got {args.bucket_size}"
        )
    try:
        return QuantConfig(
            bits=args.bits,
            bucket_size=args.bucket_size,
            method=args.method,
            include=None if args.include is None else tuple(args.include),
            exclude=tuple(args.exclude),
            keep_first_last=args.keep_first_last,
            grid=getattr(args, "grid", "minmax"),
        )
    except ValueError as exc:
        message = str(exc).replace("bits must", "--bits must", 1)
        message = message.replace("include:", "--include:").replace("exclude:", "--exclude:")
        message = message.replace("grid='int4_kernel' needs", "--grid int4_kernel needs", 1)
        raise UsageError(message) from None
