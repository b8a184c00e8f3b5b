"""The ``qdistill`` command. Subcommands come from the ``qdistill.commands`` entry-point group,
so the plugins add theirs without the core knowing about them.

An entry point names a function ``register(subparsers)`` that adds one subcommand and sets
``func`` (``args -> int`` exit code) as its default. A user mistake raises
:class:`UsageError`; ``main`` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

from compressor.format.files import CheckpointError, OutputError


class UsageError(ValueError):
    """A mistake in the user's input: reported as one line, without a traceback."""


def _version() -> str:
    try:
        return version("qdistill")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdistill",
        description="Compress models by quantized distillation: inspect, pack and unpack "
        "quantized model files, and run the OpenNMT-py and torchvision tools.",
    )
    parser.add_argument("--version", action="version", version=f"qdistill {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="qdistill.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional plugin whose dependencies are missing
            print(f"qdistill: command {ep.name!r} unavailable ({exc})", file=sys.stderr)
            continue
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, OutputError, CheckpointError) as exc:
        print(f"qdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qdistill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
