"""Files that appear whole or not at all, outputs that never replace a user's inputs, and
checkpoints loaded without running pickled code.

Every writer in qdistill goes through :func:`atomic_write` (temporary name in the target's
folder, flush, fsync, rename, fsync of the folder), so a kill at any moment leaves either the
old file or the new one. Every command checks its outputs with :func:`check_output` before it
starts: an output that is one of its inputs is refused, and an existing file is replaced only
with ``force=True`` and only when it is recognisably a file that qdistill wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

WRITTEN_BY = "qdistill_written_by"
"""Key that marks a dict checkpoint, a JSON document or safetensors metadata as qdistill's."""

EXPORT_MARKER = ".qdistill-export.json"
"""File inside a directory qdistill exported; lists the files it wrote there."""


class CheckpointError(ValueError):
    """A file that is not a checkpoint loadable with ``weights_only=True``."""


class OutputError(ValueError):
    """An output that would replace a user's input or a file qdistill did not write."""


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); ``mkstemp`` gives 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; when the block ends without error it is
    flushed, fsynced and renamed to ``path`` (then the folder is fsynced). On error, or a
    kill, ``path`` is untouched and the temporary file is removed (or left as a dot-file that
    no reader mistakes for the real one)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> int:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return len(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file under ``path``."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``path``; filled by the block, then renamed to ``path``
    (an existing ``path`` is removed first: callers check with :func:`check_output_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        for item in staging.rglob("*"):
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "export")
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(path.parent)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path, through symbolic or hard links."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    force: bool = False,
    ours: Callable[[Path], bool] | None = None,
    what: str = "qdistill",
) -> Path:
    """Check, before any work, that ``output`` may be written; create its folder.

    Refused with :class:`OutputError`: an output that is one of ``inputs`` (also through
    links); an existing directory; an existing file without ``force``; with ``force``, an
    existing file for which ``ours`` (the caller's test that qdistill wrote it) is false."""
    output = Path(output)
    for source in inputs:
        if source is not None and same_file(output, source):
            raise OutputError(f"-o {output} is also an input ({source}); choose another output")
    if output.is_dir():
        raise OutputError(f"-o {output} is a directory; give a file name inside it")
    if output.exists() or output.is_symlink():
        if not force:
            raise OutputError(f"{output} exists; pass --force to replace it")
        if ours is not None and not _safely(ours, output):
            raise OutputError(
                f"{output} exists and is not a file that {what} wrote; --force replaces only "
                "qdistill's own earlier output: remove it yourself or choose another -o"
            )
    if output.parent.exists() and not output.parent.is_dir():
        raise OutputError(f"{output.parent} is a file, not a folder (for -o {output})")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def check_output_dir(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    force: bool = False,
) -> Path:
    """Like :func:`check_output` for a directory that a command fills and replaces whole.

    An existing directory is replaced only with ``force`` and only when it is an export that
    qdistill wrote (:data:`EXPORT_MARKER` lists every file in it) and holds none of
    ``inputs`` and not the working directory."""
    output = Path(output)
    resolved = output.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if src == resolved or resolved in src.parents:
            raise OutputError(f"-o {output} contains the input {source}; choose another output")
    if output.exists() and not output.is_dir():
        raise OutputError(f"-o {output} is a file, not a directory")
    if output.is_dir():
        if not force:
            raise OutputError(f"{output} exists; pass --force to replace it")
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise OutputError(f"-o {output} holds the working directory; choose another output")
        if not is_our_export(output):
            raise OutputError(
                f"{output} exists and is not a directory that qdistill exported (or holds other "
                "files too); --force replaces only qdistill's own earlier export: remove it "
                "yourself or choose another -o"
            )
    return output


def write_export_marker(folder: Path, **info: Any) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    atomic_write_json(folder / EXPORT_MARKER, {WRITTEN_BY: info, "files": files})


def is_our_export(folder: Path) -> bool:
    """A directory whose marker lists every file in it (nothing the user added)."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text())
        listed = set(marker["files"]) | {EXPORT_MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}
    return present <= listed


def _safely(test: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(test(path))
    except Exception:  # an unreadable file is not recognisably ours
        return False


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with ``argparse.Namespace``
    allow-listed: OpenNMT-py and torchvision's references pickle their arguments into every
    checkpoint, and torch >= 2.6 refuses them otherwise. Anything else pickled is refused."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (an interrupted write?), not a checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
        if _looks_like_text(head):
            raise CheckpointError(
                f"{path} is a text file, not a checkpoint (not a PyTorch checkpoint that "
                "torch.save wrote)"
            )
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save did not write it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        reason = _why(exc)
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint that loads safely: {reason}"
        ) from None


def _looks_like_text(head: bytes) -> bool:
    if not head or head.startswith((b"PK\x03\x04", b"\x80")):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end is still text
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\n\r\t\f" for c in text)


def is_text_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as text does (a file given where a checkpoint belongs)."""
    with open(path, "rb") as handle:
        return _looks_like_text(handle.read(512))


def _why(exc: Exception) -> str:
    """One line for a failed safe load, without torch's advice to turn the safety off."""
    message = str(exc)
    if "Weights only load failed" in message:
        for line in message.splitlines():
            if "WeightsUnpickler error:" in line:
                reason = line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
                return f"it pickles something other than tensors and plain data ({reason})"
        return "it pickles something other than tensors and plain data; refused (it could run code)"
    first = (message.strip().splitlines() or [type(exc).__name__])[0]
    if "central directory" in first or "PytorchStreamReader" in first:
        return "the archive is incomplete or damaged (an interrupted write?)"
    return first


def written_by(path: str | os.PathLike) -> str | None:
    """The qdistill command recorded in a dict checkpoint or a JSON document, if any."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix == ".json" else load_checkpoint(path)
    if isinstance(data, dict):
        value = data.get(WRITTEN_BY)
        return value if isinstance(value, str) else None
    return None
