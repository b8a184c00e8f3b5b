"""``qdistill inspect``, ``qdistill pack`` and ``qdistill unpack``."""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from compressor.cli import UsageError
from compressor.cli.flags import add_quantization_flags, quant_config
from compressor.format.files import WRITTEN_BY, check_output, is_text_file
from compressor.quantization.record import QuantRecord
from compressor.surgery.config import QuantConfig
from compressor.surgery.quantize import quantized_state_from_training

UNPACKED_BY = "qdistill unpack"


def _existing_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path} is a directory; give a file")
    if not p.is_file():
        raise UsageError(f"no such file: {path}")
    return p


CHECKPOINT_FORMATS = "qdistill.checkpoint_formats"


def checkpoint_formats() -> dict[str, object]:
    """Plugins that know a framework's checkpoint layout, by name (entry-point group
    ``qdistill.checkpoint_formats``). Each is a module with ``from_checkpoint(checkpoint)``,
    returning ``(state, metadata)`` or None when the checkpoint is not its kind, and
    ``to_checkpoint(state, metadata)``, the inverse, used by ``qdistill unpack``. Optionally
    also ``rebuilt_at_load(state, metadata)``, ``{name: why}`` for deterministic tensors that
    need not be stored because ``rebuild(state, metadata)`` recreates them exactly (it fills
    the placeholders that loading gives for them; ``to_checkpoint`` calls it too)."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=CHECKPOINT_FORMATS):
        try:
            found[ep.name] = ep.load()
        except ImportError:  # an optional plugin whose dependencies are missing
            continue
    return found


def load_checkpoint_state(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """A state dict from a ``.pt`` checkpoint (a plain state dict, a dict with a ``model`` key
    as torchvision's references save, or a layout a plugin knows) or a ``.safetensors`` file,
    loaded without running any pickled code. Also returns the checkpoint's recorded qdistill
    settings, if any, and the metadata a packed file needs to rebuild the checkpoint."""
    import torch

    from compressor.format.packed import is_packed

    path = Path(path)
    if is_packed(path):
        raise UsageError(f"{path} is already a packed file (qdistill unpack turns it back)")
    text = (
        f"{path} is a text file, not a checkpoint; give the .pt file that torch.save wrote "
        "(a state dict, or a dict with a 'model' key) or a .safetensors file"
    )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}, {}
        except Exception as exc:
            if path.is_file() and is_text_file(path):
                raise UsageError(text) from None
            raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    from compressor.format.files import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(checkpoint, Mapping):
        raise UsageError(f"{path}: expected a state dict or a dict with a 'model' key")
    recorded = checkpoint.get("qdistill") if isinstance(checkpoint.get("qdistill"), Mapping) else {}
    for name, plugin in checkpoint_formats().items():
        try:
            found = plugin.from_checkpoint(checkpoint)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        if found is not None:
            state, metadata = found
            return state, dict(recorded), {"checkpoint_format": name, **metadata}
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping) or not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise UsageError(f"{path}: holds no tensors under 'model' or at its top level")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, dict(recorded), {}


def pack_checkpoint(
    state: Mapping,
    output: str | os.PathLike,
    config: QuantConfig | None = None,
    entropy: str | None = None,
    record: QuantRecord | None = None,
    metadata: Mapping | None = None,
    shadow: Mapping | None = None,
    rebuilt: Mapping[str, str] | None = None,
) -> int:
    """Pack a state dict; returns the size of the written file in bytes.

    With a ``record`` (how a training run or ``onmt-quantize`` quantized the checkpoint) the
    tensors it names must hold quantized values and are stored exactly (verified bit for bit);
    the ``shadow`` weights or the record's codes give the codes of learned grids. Without one,
    the tensors ``config`` selects are quantized first, by the rule ``quantize_`` uses
    (:func:`compressor.quantize_state_dict`). ``rebuilt`` names the tensors to leave out
    because loading rebuilds them exactly (a plugin's ``rebuilt_at_load``)."""
    from compressor.format.packed import write_packed
    from compressor.surgery.quantize import quantize_state_dict

    if not record:
        state, record = quantize_state_dict(state, config or QuantConfig())
    return write_packed(
        state,
        output,
        metadata,
        dict(record.specs),
        entropy,
        shadow,
        codes=dict(record.codes),
        rebuilt=rebuilt,
    )


def rebuilt_at_load(state: Mapping, metadata: Mapping) -> dict[str, str]:
    """What the checkpoint's format plugin says need not be stored (``{name: why}``)."""
    plugin = checkpoint_formats().get(metadata.get("checkpoint_format"))
    find = getattr(plugin, "rebuilt_at_load", None)
    if find is None:
        return {}
    try:
        return dict(find(state, metadata))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def rebuild_placeholders(state: Mapping, metadata: Mapping, source: object) -> Mapping:
    """A loaded packed state with the tensors left out of the file rebuilt by the checkpoint's
    format plugin (``UsageError`` when that plugin is not installed here)."""
    missing = [name for name, value in state.items() if value.is_meta]
    if not missing:
        return state
    kind = metadata.get("checkpoint_format")
    plugin = checkpoint_formats().get(kind)
    if plugin is None or not hasattr(plugin, "rebuild"):
        what = (
            f"the {kind!r} checkpoint format, which is not installed here"
            if kind
            else "no checkpoint format the file names"
        )
        raise UsageError(
            f"{source}: {missing[0]} (and {len(missing) - 1} more) were left out of the file, "
            f"to be rebuilt at load by {what}"
        )
    try:
        return dict(plugin.rebuild(state, metadata))
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None


def _inspect(args: argparse.Namespace) -> int:
    from compressor.format.packed import PackedFormatError, packed_summary

    path = _existing_file(args.file)
    try:
        rows, coders = packed_summary(path)
    except PackedFormatError as exc:
        raise UsageError(str(exc)) from None
    header = (
        f"{'tensor':<44} {'shape':>16} {'bits':>5} {'bucket':>7} {'coding':>8} {'bytes':>11} "
        f"{'code bits':>9}  {'grid':<11}"
    )
    print(header)
    print("-" * len(header))
    fp32 = 0
    weights = 0
    code_bits_total = 0.0
    kernel, decoded, rebuilt = [], [], []
    for r in rows:
        numel = 1
        for d in r.shape:
            numel *= d
        if r.coding.startswith("tied") or r.rebuilt:
            coding = "tied" if not r.rebuilt else "rebuilt"
            print(
                f"{r.name[:44]:<44} {str(list(r.shape)):>16} {'':>5} {'':>7} {coding:>8} {0:>11,}"
            )
            if r.rebuilt:
                rebuilt.append((r, numel))
            continue
        fp32 += 4 * numel
        bits = "-" if r.spec is None else str(r.spec.bits)
        bucket = "-" if r.spec is None else str(r.spec.bucket_size)
        mean = "" if r.code_bits is None else f"{r.code_bits:.3f}"
        if r.code_bits is not None:
            weights += numel
            code_bits_total += r.code_bits * numel
        grid = "" if r.spec is None else _grid_name(r.spec, r.shape)
        if r.spec is not None:
            (kernel if grid == "int4 kernel" else decoded).append(r.name)
        print(
            f"{r.name[:44]:<44} {str(list(r.shape)):>16} {bits:>5} {bucket:>7} {r.coding:>8} "
            f"{r.stored_bytes:>11,} {mean:>9}  {grid:<11}"
        )
    size = path.stat().st_size
    print("-" * len(header))
    mean = (
        f"{code_bits_total / weights:.3f} bits/weight over {weights:,} quantized weights"
        if weights
        else ""
    )
    print(f"file {size:,} bytes; fp32 {fp32:,} bytes; compression {fp32 / size:.2f}x; {mean}")
    if rebuilt:
        left_out = sum(numel * _ITEMSIZE.get(r.dtype, 4) for r, numel in rebuilt)
        print(
            f"left out of the file, rebuilt at load: {len(rebuilt)} tensors, {left_out:,} bytes "
            "(not counted in fp32 above)"
        )
        for r, _ in rebuilt:
            print(f"  {r.name} {list(r.shape)} {r.dtype}: {r.rebuilt}")
    if kernel:
        print(
            f"int4 runtime: {len(kernel)} quantized tensors on the int4 kernel grid run on the "
            "int4 kernel (Linear, LSTM, LSTMCell weights; embeddings look their rows up from "
            f"the codes); {len(decoded)} on other grids are decoded to their dtype"
        )
    for c in coders:
        print(
            f"{c.kind} coder, {c.levels} levels: {c.symbols:,} indices in "
            f"{c.stream_bytes:,} bytes, {c.mean_bits:.3f} bits/index against an empirical "
            f"entropy of {c.entropy_bits:.3f}"
        )
    return 0


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _grid_name(spec, shape: tuple[int, ...]) -> str:
    if spec.runs_on_int4_kernel(shape):
        return "int4 kernel"
    return {"uniform": "minmax", "nonuniform": "points"}.get(spec.method, spec.method)


def _pack(args: argparse.Namespace) -> int:
    from compressor.format.packed import is_packed

    source = _existing_file(args.checkpoint)
    config = quant_config(args)
    check_output(args.output, [source], force=args.force, ours=is_packed, what="qdistill pack")
    state, recorded, metadata = load_checkpoint_state(source)
    record = None
    if recorded.get("specs") and not args.requantize:
        try:
            record = QuantRecord.from_dict(recorded)
            if any(".parametrizations." in key for key in state):  # a training checkpoint
                state = quantized_state_from_training(state, record)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{source}: {exc} (or pass --requantize)") from None
    entropy = None if args.entropy == "none" else args.entropy
    rebuilt = rebuilt_at_load(state, metadata)
    try:
        size = pack_checkpoint(
            state,
            args.output,
            config,
            entropy=entropy,
            record=record,
            metadata={"source": source.name, **metadata},
            shadow=None if record is None else recorded.get("shadow"),
            rebuilt=rebuilt,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ratio = source.stat().st_size / size
    print(f"wrote {args.output}: {size:,} bytes ({ratio:.2f}x smaller than {source.name})")
    if rebuilt:
        left_out = sum(state[n].numel() * state[n].element_size() for n in rebuilt)
        print(
            f"left out {len(rebuilt)} tensors ({left_out:,} bytes) that loading rebuilds "
            f"exactly: {', '.join(rebuilt)} (qdistill inspect says why)"
        )
    return 0


def unpacked_by_us(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that ``qdistill unpack`` wrote: a .safetensors file whose
    metadata, or a .pt checkpoint whose top-level dict (or, for a plain state dict, whose
    ``_metadata``, which ``load_state_dict`` ignores), carries :data:`WRITTEN_BY`. A file
    that does not load is not."""
    from compressor.format.files import load_checkpoint

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return WRITTEN_BY in (handle.metadata() or {})
        checkpoint = load_checkpoint(path)
    except Exception:  # CheckpointError, OSError, and safetensors' own error types
        return False
    if not isinstance(checkpoint, Mapping):
        return False
    marker = getattr(checkpoint, "_metadata", None)
    return WRITTEN_BY in checkpoint or (isinstance(marker, Mapping) and WRITTEN_BY in marker)


def _unpack(args: argparse.Namespace) -> int:
    from compressor.format.files import atomic_save, atomic_write_bytes
    from compressor.format.packed import PackedFormatError, load_packed

    source = _existing_file(args.file)
    output = Path(args.output)
    if output.suffix not in (".pt", ".safetensors"):
        raise UsageError(f"-o must end in .pt or .safetensors, got {output.name}")
    check_output(output, [source], force=args.force, ours=unpacked_by_us, what="qdistill unpack")
    try:
        state, metadata = load_packed(source)
    except PackedFormatError as exc:
        raise UsageError(str(exc)) from None
    state = rebuild_placeholders(state, metadata, source)
    plugin = checkpoint_formats().get(metadata.get("checkpoint_format"))
    if output.suffix == ".safetensors":
        from safetensors.torch import save

        tensors, seen = {}, set()
        for name, value in state.items():  # safetensors stores no shared (tied) tensors
            storage = value.untyped_storage().data_ptr()
            tensors[name] = value.contiguous().clone() if storage in seen else value.contiguous()
            seen.add(storage)
        atomic_write_bytes(output, save(tensors, {WRITTEN_BY: UNPACKED_BY}))
    elif plugin is not None:
        try:
            checkpoint = plugin.to_checkpoint(state, metadata)
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}") from None
        if isinstance(checkpoint, dict):
            checkpoint[WRITTEN_BY] = UNPACKED_BY
        atomic_save(checkpoint, output)
    else:
        # A plain state dict: a key of our own would upset load_state_dict, but the
        # ``_metadata`` it carries (module versions) survives torch.load(weights_only=True)
        # and is only ever looked up by module prefix.
        plain = OrderedDict(state)
        plain._metadata = {WRITTEN_BY: {"command": UNPACKED_BY}}
        atomic_save(plain, output)
    print(f"wrote {output}: {len(state)} tensors")
    return 0


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="per-tensor sizes of a packed model file")
    p.add_argument("file")
    p.set_defaults(func=_inspect)


def register_pack(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pack", help="quantize a checkpoint (.pt/.safetensors) into a packed file"
    )
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    add_quantization_flags(p)
    p.add_argument("--entropy", choices=("none", "huffman", "ans"), default="none")
    p.add_argument(
        "--requantize",
        action="store_true",
        help="ignore quantization settings recorded in the checkpoint",
    )
    p.add_argument(
        "--force", action="store_true", help="replace -o if it is a packed file written before"
    )
    p.set_defaults(func=_pack)


def register_unpack(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("unpack", help="decode a packed file to a .pt or .safetensors")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--force", action="store_true", help="replace -o if it is an earlier unpack's output"
    )
    p.set_defaults(func=_unpack)
