"""Packed model files: quantized tensors stored as their codes, really small on disk.

The container is safetensors (no pickle anywhere on the load path). A quantized tensor ``w``
is stored as ``w::offset`` and ``w::scale`` (fp32, one per bucket) plus its codes: either
``w::codes``, bit-packed at its bit width, or its share of one entropy-coded stream pooled over
every tensor with the same number of levels (``::<levels>::stream``, Huffman or rANS under one
histogram). Any other tensor is stored as it is; tied tensors once. The metadata holds the
format version, each tensor's shape, dtype and :class:`QuantSpec`, the coders' tables, a
SHA-256 over the metadata and every payload byte, and the user's metadata.

Loading validates every declared size against the bytes present before allocating, so a
truncated, corrupted or hostile file raises :class:`PackedFormatError` instead of crashing,
hanging or allocating out of proportion to the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.format import bitpack, entropy
from compressor.quantization.grids import BucketCodes
from compressor.quantization.record import QuantSpec

FORMAT = "qdistill-packed"
VERSION = 2
ENTROPY_CODERS = (None, "huffman", "ans")
_SEP = "::"
# An rANS stream may not claim more than this many weights per stored bit.
_MAX_WEIGHTS_PER_BIT = 256
# ... beyond this many weights, which any stream may hold (4 MB of fp32 at most).
_ANS_FREE_SYMBOLS = 1 << 20
_MAX_DIM = 2**40
# Header field holding a state dict's ``_metadata`` (module versions that load_state_dict reads).
_MODULE_VERSIONS = "module_versions"
_SCALARS = (str, int, float, bool, type(None))

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class PackedFormatError(ValueError):
    """A file that is not a valid qdistill packed file (truncated, corrupted or hostile)."""


@dataclass(frozen=True)
class PackedTensorInfo:
    """What :func:`packed_info` reports for one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: QuantSpec | None
    coding: str  # "raw", "bitpack", "huffman", "ans" or "tied to <name>"
    stored_bytes: int
    code_bits: float | None  # mean bits per weight of the codes (None for raw tensors)


@dataclass(frozen=True)
class PackedCoderInfo:
    """One entropy coder of a packed file: its pooled index statistics."""

    levels: int
    kind: str
    symbols: int
    stream_bytes: int  # the coded stream plus its chunk table
    entropy_bits: float  # empirical entropy of the pooled indices, bits per weight

    @property
    def mean_bits(self) -> float:
        return 8 * self.stream_bytes / self.symbols if self.symbols else 0.0


# --------------------------------------------------------------------------------------------
# Saving.


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _checksum(header: Mapping[str, str], payload: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every metadata field but the checksum, and every payload tensor."""
    digest = hashlib.sha256()
    for key in sorted(header):
        if key != "checksum":
            digest.update(f"{len(key)}:{key}{len(header[key])}:".encode())
            digest.update(header[key].encode())
    for key in sorted(payload):
        array = np.ascontiguousarray(payload[key])
        digest.update(f"{len(key)}:{key}{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


def _encode_checked(name: str, value: torch.Tensor, spec: QuantSpec, given) -> BucketCodes:  # noqa: ANN001
    """Codes for ``value``, verified to decode to exactly its bits."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: the tensor holds NaN or infinite values (did training diverge?)")
    encoded = given if given is not None else spec.encode(value)
    decoded = spec.decode(encoded, value.shape, value.dtype)
    if not torch.equal(decoded, value):
        how = (
            "pack the quantized (parametrized) model or its training checkpoint with shadow "
            "weights instead"
            if spec.method == "nonuniform"
            else "quantize it first (spec.quantize) or pack the quantized model"
        )
        raise ValueError(
            f"{name}: the tensor is not on the {spec.method} {spec.bits}-bit grid of bucket size "
            f"{spec.bucket_size}; {how}"
        )
    return encoded


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_packed(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    specs: Mapping[str, QuantSpec] | None = None,
    entropy: str | None = None,
    shadow: Mapping[str, torch.Tensor] | None = None,
    codes: Mapping[str, BucketCodes] | None = None,
) -> int:
    """Write a packed model file from a state dict; returns its size in bytes.

    Args:
        state_dict: plain-named tensors, the quantized ones holding their quantized values
            (re-encoded and verified bit for bit).
        path: where to write; the file appears there complete or not at all.
        metadata: JSON-serialisable data stored alongside (architecture, vocabulary, ...).
        specs: ``{name: QuantSpec}`` for the quantized tensors.
        entropy: None (codes bit-packed at their width), "huffman" (the paper's code over the
            pooled histogram) or "ans" (rANS, at the entropy bound; needs ``constriction``).
        shadow: the full-precision weights the quantized tensors came from (a training
            checkpoint's shadow weights): codes are encoded from them, which grids whose
            points stop short of a bucket's ends (learned points) need.
        codes: codes already known (a model's quantizers give them), by name.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"write_packed takes a state dict, got {type(state_dict).__name__}")
    if entropy not in ENTROPY_CODERS:
        raise ValueError(f"entropy must be one of {ENTROPY_CODERS}, got {entropy!r}")
    if entropy == "ans" and not entropy_ans_available():
        raise ValueError("entropy='ans' needs the 'constriction' package: pip install constriction")
    try:
        user = _json(dict(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable ({exc})") from None
    specs = dict(specs or {})
    given_codes = {n: specs[n].encode(shadow[n]) for n in specs if n in (shadow or {})}
    given_codes.update(codes or {})
    tensors = dict(state_dict)
    unknown = sorted(set(specs) - set(tensors))
    if unknown:
        raise ValueError(f"specs name tensors that are not in the state dict: {unknown[:5]}")

    payload: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    first_of_storage: dict[tuple, str] = {}
    all_codes: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or _SEP in name:
            raise ValueError(f"tensor name {name!r} is empty or contains {_SEP!r} (reserved)")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: only tensors can be packed, got {type(value).__name__}")
        value = value.detach().cpu()
        key = _storage_key(value)
        if key in first_of_storage and value.numel():
            entries[name] = {"tied": first_of_storage[key]}
            continue
        first_of_storage[key] = name
        spec = specs.get(name)
        if spec is None:
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16: keep its bits
                payload[name] = value.contiguous().view(torch.int16).numpy()
            else:
                payload[name] = value.contiguous().numpy()
            entries[name] = {"raw": _dtype_name(value.dtype)}
            continue
        if _dtype_name(value.dtype) not in _DTYPES:
            raise ValueError(f"{name}: quantized tensors must be floating point, got {value.dtype}")
        encoded = _encode_checked(name, value, spec, given_codes.get(name))
        payload[f"{name}{_SEP}offset"] = encoded.offset.contiguous().numpy()
        payload[f"{name}{_SEP}scale"] = encoded.scale.contiguous().numpy()
        all_codes[name] = encoded.codes.contiguous().numpy().astype(np.uint8, copy=False)
        entries[name] = {
            "shape": list(value.shape),
            "dtype": _dtype_name(value.dtype),
            "spec": spec.to_dict(),
        }

    coders = _store_codes(all_codes, specs, payload, entries, entropy)
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "tensors": _json(entries),
        "coders": _json(coders),
        "user": user,
    }
    header.update(_module_versions_field(state_dict))
    header["checksum"] = _checksum(header, payload)
    return _write_atomic(path, payload, header)


def _checked_versions(pairs: Iterable[tuple[object, object]]) -> dict[str, dict]:
    """``{module name: {key: JSON scalar}}``, as ``state_dict._metadata`` holds them."""
    out = {}
    for name, entry in pairs:
        if not (
            isinstance(name, str)
            and isinstance(entry, Mapping)
            and all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in entry.items())
        ):
            raise ValueError("module versions must map module names to {key: JSON scalar}")
        out[name] = dict(entry)
    return out


def _module_versions_field(state_dict: object) -> dict[str, str]:
    """The header field keeping ``state_dict._metadata``, the module versions that some
    modules' ``load_state_dict`` reads (torchvision's MNASNet, ViT): ``[[entry, [module
    names]], ...]``, one group per distinct entry. Empty if the state dict has none."""
    versions = getattr(state_dict, "_metadata", None)
    if versions is None:
        return {}
    groups: dict[str, list[str]] = {}
    for name, entry in _checked_versions(versions.items()).items():
        groups.setdefault(_json(entry), []).append(name)
    return {_MODULE_VERSIONS: _json([[json.loads(e), names] for e, names in groups.items()])}


def _with_module_versions(state: dict[str, torch.Tensor], field: str | None) -> OrderedDict:
    """The loaded state as ``model.state_dict()`` gives it: an OrderedDict with the stored
    ``_metadata`` (checked: a damaged field raises PackedFormatError)."""
    out = OrderedDict(state)
    if field is not None:
        try:
            groups = json.loads(field)
            if not isinstance(groups, list) or not all(
                isinstance(g, list) and len(g) == 2 and isinstance(g[1], list) for g in groups
            ):
                raise ValueError("not a list of [entry, [module names]]")
            out._metadata = _checked_versions((n, entry) for entry, names in groups for n in names)
        except (ValueError, RecursionError) as exc:
            raise PackedFormatError(f"damaged module versions ({exc})") from None
    return out


def entropy_ans_available() -> bool:
    """Whether rANS coding (``entropy="ans"``) can be used here."""
    return entropy.ans_available()


def _store_codes(
    all_codes: dict[str, np.ndarray],
    specs: Mapping[str, QuantSpec],
    payload: dict[str, np.ndarray],
    entries: dict[str, dict],
    coder_kind: str | None,
) -> dict[str, dict]:
    """Bit-pack every tensor's codes, or entropy-code them pooled by alphabet size."""
    groups: dict[int, list[str]] = {}
    for name in sorted(all_codes):
        if coder_kind is None or not all_codes[name].size:  # empty tensors: 0 bytes either way
            payload[f"{name}{_SEP}codes"] = bitpack.pack_bits(all_codes[name], specs[name].bits)
            entries[name]["coding"] = "bitpack"
        else:
            groups.setdefault(specs[name].num_levels, []).append(name)
    coders: dict[str, dict] = {}
    for levels, names in groups.items():
        symbols = np.concatenate([all_codes[n] for n in names])
        hist = np.bincount(symbols, minlength=levels)[:levels]
        key = str(levels)
        coder: dict = {
            "kind": coder_kind,
            "tensors": names,
            "symbols": int(symbols.size),
            "counts": hist.tolist(),
        }
        kind = coder_kind
        if kind == "ans" and np.count_nonzero(hist) < 2:
            # A single symbol costs rANS almost nothing: too little data for the loader's
            # bound on weights per stored bit. Huffman spends one bit each.
            kind = "huffman"
        coder["kind"] = kind
        if kind == "huffman":
            lengths = entropy.huffman_lengths(hist)
            stream, chunks = entropy.huffman_encode(symbols, lengths)
            payload[f"{_SEP}{key}{_SEP}chunks"] = chunks
            coder.update(lengths=lengths.tolist(), chunk=entropy.HUFFMAN_CHUNK)
            code_length = lengths
        else:
            stream = entropy.ans_encode(symbols, hist)
            code_length = -np.log2(np.maximum(hist, 1) / max(int(hist.sum()), 1))
        payload[f"{_SEP}{key}{_SEP}stream"] = stream
        coders[key] = coder
        for name in names:
            entries[name]["coding"] = kind
            entries[name]["coder"] = key
            # This tensor's share of the stream, for reports (whole bits, or ideal for rANS).
            share = np.bincount(all_codes[name], minlength=levels)[:levels] @ code_length
            entries[name]["code_bits"] = int(round(float(share)))
    return coders


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); temporary files from
    ``mkstemp`` are 0o600, which a file meant to be shared should not keep."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: str | os.PathLike, payload: dict[str, np.ndarray], header: dict) -> int:
    from safetensors.numpy import save

    path = Path(path)
    data = save(payload, metadata=header)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


# --------------------------------------------------------------------------------------------
# Loading.


def _read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The payload and metadata of a safetensors file, checked by safetensors itself (every
    tensor's bytes inside the file) before anything is allocated from it."""
    from safetensors.numpy import load

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise PackedFormatError(f"{path}: is a directory, not a packed file") from None
    try:
        payload = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # safetensors reports malformed files in its own error types
        raise PackedFormatError(f"{path}: not a safetensors file ({exc})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PackedFormatError(f"{path}: damaged safetensors metadata")
    return payload, metadata


def _parse_header(path: object, header: Mapping[str, str]) -> tuple[dict, dict, dict]:
    if header.get("format") != FORMAT:
        raise PackedFormatError(f"{path}: not a qdistill packed file (no '{FORMAT}' marker)")
    if header.get("version") != str(VERSION):
        raise PackedFormatError(
            f"{path}: format version {header.get('version')!r}; this qdistill reads {VERSION}"
        )
    try:
        entries = json.loads(header["tensors"])
        coders = json.loads(header["coders"])
        user = json.loads(header["user"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise PackedFormatError(f"{path}: damaged metadata ({exc})") from None
    if not all(isinstance(x, dict) for x in (entries, coders, user)):
        raise PackedFormatError(f"{path}: damaged metadata (wrong types)")
    if not all(isinstance(e, dict) for e in entries.values()):
        raise PackedFormatError(f"{path}: damaged metadata (tensor entries)")
    return entries, coders, user


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PackedFormatError(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return value


def _shape(name: str, entry: dict) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 16:
        raise PackedFormatError(f"{name}: invalid shape {shape!r}")
    return tuple(_int(d, f"{name}: shape", 0, _MAX_DIM) for d in shape)


def _array(payload: Mapping[str, np.ndarray], key: str, dtype: type) -> np.ndarray:
    if key not in payload:
        raise PackedFormatError(f"missing tensor {key!r}")
    array = payload[key]
    if array.dtype != dtype or array.ndim != 1:
        raise PackedFormatError(f"{key} must be 1-D {np.dtype(dtype).name}")
    return array


def _spec(name: str, entry: dict) -> QuantSpec:
    try:
        spec = QuantSpec.from_dict(entry["spec"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise PackedFormatError(f"{name}: invalid quantization spec ({exc})") from None
    if spec.points is not None and not all(0.0 <= p <= 1.0 for p in spec.points):
        raise PackedFormatError(f"{name}: quantization points outside [0, 1]")
    return spec


def _decode_pooled(
    key: str, coder: dict, entries: dict, payload: Mapping, declared: dict[str, tuple]
) -> dict[str, np.ndarray]:
    """Decode one pooled entropy-coded stream and cut it into its tensors' codes."""
    names = coder.get("tensors")
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise PackedFormatError(f"coder {key}: invalid tensor list")
    for name in names:
        entry = entries.get(name)
        if not isinstance(entry, dict) or entry.get("coder") != key or name not in declared:
            raise PackedFormatError(f"coder {key}: lists {name!r}, which does not use it")
    alphabet = int(key)
    if {declared[n][1].num_levels for n in names} != {alphabet}:
        raise PackedFormatError(f"coder {key}: tensors with another number of levels")
    count = sum(math.prod(declared[n][0]) for n in names)
    if coder.get("symbols") != count:
        raise PackedFormatError(
            f"coder {key}: {coder.get('symbols')!r} symbols, tensors hold {count}"
        )
    kind = coder.get("kind")
    try:
        if kind == "huffman":
            stream = _array(payload, f"{_SEP}{key}{_SEP}stream", np.uint8)
            chunks = _array(payload, f"{_SEP}{key}{_SEP}chunks", np.uint32)
            lengths = entropy.check_lengths(np.asarray(coder.get("lengths")), alphabet)
            chunk = _int(coder.get("chunk"), f"coder {key}: chunk", 1, 1 << 16)
            if count > 8 * stream.size:
                raise PackedFormatError(f"coder {key}: {count} weights in {stream.size} bytes")
            symbols = entropy.huffman_decode(stream, chunks, lengths, count, chunk)
        elif kind == "ans":
            if not entropy.ans_available():
                raise PackedFormatError("the file is rANS-coded; install 'constriction' to read it")
            words = _array(payload, f"{_SEP}{key}{_SEP}stream", np.uint32)
            counts = np.asarray(coder.get("counts"))
            if (
                counts.shape != (alphabet,)
                or counts.dtype.kind not in "iu"
                or counts.min() < 0
                or not counts.sum()
            ):
                raise PackedFormatError(f"coder {key}: invalid rANS histogram")
            if count > max(_MAX_WEIGHTS_PER_BIT * 32 * words.size, _ANS_FREE_SYMBOLS):
                raise PackedFormatError(f"coder {key}: {count} weights in {words.size} words")
            symbols = entropy.ans_decode(words, counts, count)
        else:
            raise PackedFormatError(f"coder {key}: unknown kind {kind!r}")
    except entropy.CodingError as exc:
        raise PackedFormatError(f"coder {key}: {exc}") from None
    out, start = {}, 0
    for name in names:
        numel = math.prod(declared[name][0])
        out[name] = symbols[start : start + numel]
        start += numel
    return out


def _quantized_tensor(
    name: str, entry: dict, spec: QuantSpec, shape: tuple, payload: Mapping, pooled: Mapping
) -> torch.Tensor:
    numel = math.prod(shape)
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise PackedFormatError(f"{name}: unsupported dtype {entry.get('dtype')!r}")
    offset = _array(payload, f"{name}{_SEP}offset", np.float32)
    scale = _array(payload, f"{name}{_SEP}scale", np.float32)
    if offset.size != spec.num_buckets(numel) or scale.size != offset.size:
        raise PackedFormatError(
            f"{name}: {offset.size} buckets stored, shape {list(shape)} with bucket "
            f"size {spec.bucket_size} needs {spec.num_buckets(numel)}"
        )
    coding = entry.get("coding")
    if coding == "bitpack":
        data = _array(payload, f"{name}{_SEP}codes", np.uint8)
        try:
            codes = bitpack.unpack_bits(data, spec.bits, numel)
        except bitpack.BitPackError as exc:
            raise PackedFormatError(f"{name}: {exc}") from None
    elif coding in ("huffman", "ans") and name in pooled:
        codes = pooled[name]
    else:
        raise PackedFormatError(f"{name}: unknown or unlisted coding {coding!r}")
    if codes.size and int(codes.max()) >= spec.num_levels:
        raise PackedFormatError(f"{name}: a code exceeds the {spec.num_levels} levels")
    encoded = BucketCodes(
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(offset.copy()),
        torch.from_numpy(scale.copy()),
    )
    return spec.decode(encoded, shape, dtype)


def _raw_tensor(name: str, dtype_name: object, payload: Mapping) -> torch.Tensor:
    if name not in payload:
        raise PackedFormatError(f"missing tensor {name!r}")
    array = payload[name]
    if dtype_name == "bfloat16":
        if array.dtype != np.int16:
            raise PackedFormatError(f"{name}: bfloat16 tensors are stored as int16 bits")
        return torch.from_numpy(array.copy()).view(torch.bfloat16)
    if dtype_name != str(array.dtype):
        raise PackedFormatError(f"{name}: dtype {array.dtype} but metadata says {dtype_name}")
    return torch.from_numpy(array.copy())


def _load(path: object, payload: Mapping, header: Mapping) -> tuple[dict, dict]:
    entries, coders, user = _parse_header(path, header)
    if header.get("checksum") != _checksum(header, payload):
        raise PackedFormatError("checksum mismatch: the file is corrupted")
    declared = {}
    for name, entry in entries.items():
        if "tied" not in entry and "raw" not in entry:
            declared[name] = (_shape(name, entry), _spec(name, entry))
    pooled: dict[str, np.ndarray] = {}
    for key, coder in coders.items():
        if not key.isdigit() or not isinstance(coder, dict):
            raise PackedFormatError(f"damaged coder entry {key!r}")
        pooled.update(_decode_pooled(key, coder, entries, payload, declared))
    state: dict[str, torch.Tensor] = {}
    ties = {}
    for name, entry in entries.items():
        if "tied" in entry:
            ties[name] = entry["tied"]
        elif "raw" in entry:
            state[name] = _raw_tensor(name, entry["raw"], payload)
        else:
            shape, spec = declared[name]
            state[name] = _quantized_tensor(name, entry, spec, shape, payload, pooled)
    for name, target in ties.items():
        if not isinstance(target, str) or target not in state:
            raise PackedFormatError(f"{name} is tied to missing tensor {target!r}")
        state[name] = state[target]
    return {name: state[name] for name in entries}, user


def load_packed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a packed file: the state dict (quantized tensors decoded exactly to the values the
    model was evaluated with; tied tensors shared again; an OrderedDict with the ``_metadata``
    module versions of the state dict it was written from) and the user metadata.

    Raises :class:`PackedFormatError` (saying what is wrong) for any file that is not a
    valid packed file, and ``FileNotFoundError`` for a missing one."""
    payload, header = _read(path)
    try:
        state, user = _load(path, payload, header)
        return _with_module_versions(state, header.get(_MODULE_VERSIONS)), user
    except PackedFormatError as exc:
        raise PackedFormatError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        # Every field of the metadata is untrusted: a malformed one is a damaged file.
        raise PackedFormatError(f"{path}: damaged metadata ({type(exc).__name__}: {exc})") from None
    except RuntimeError as exc:  # torch refusing a shape or size that the checks let through
        raise PackedFormatError(f"{path}: inconsistent tensor ({exc})") from None


def is_packed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a qdistill packed file, from its header alone (cheap: tools that
    accept either a checkpoint or a packed file ask this before choosing a loader)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len > min(size - 8, 1 << 28):
                return False
            metadata = json.loads(handle.read(header_len)).get("__metadata__") or {}
        return isinstance(metadata, dict) and metadata.get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def packed_specs(path: str | os.PathLike) -> dict[str, QuantSpec]:
    """The quantization spec of every quantized tensor in a packed file."""
    return {i.name: i.spec for i in packed_info(path) if i.spec is not None}


def packed_info(path: str | os.PathLike) -> list[PackedTensorInfo]:
    """Per-tensor storage of a packed file, without decoding it."""
    return packed_summary(path)[0]


def packed_summary(path: str | os.PathLike) -> tuple[list[PackedTensorInfo], list[PackedCoderInfo]]:
    """Per-tensor storage and per-coder statistics of a packed file, without decoding it."""
    payload, header = _read(path)
    try:
        entries, coders, _ = _parse_header(path, header)
        if header.get("checksum") != _checksum(header, payload):
            raise PackedFormatError("checksum mismatch: the file is corrupted")
        return _info_rows(payload, entries), _coder_rows(payload, coders)
    except PackedFormatError as exc:
        raise PackedFormatError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        raise PackedFormatError(f"{path}: damaged metadata ({exc})") from None


def _coder_rows(payload: Mapping, coders: dict) -> list[PackedCoderInfo]:
    rows = []
    for key, coder in sorted(coders.items()):
        stored = sum(
            int(payload[k].nbytes)
            for k in (f"{_SEP}{key}{_SEP}stream", f"{_SEP}{key}{_SEP}chunks")
            if k in payload
        )
        hist = np.asarray(coder.get("counts", []), dtype=np.int64)
        rows.append(
            PackedCoderInfo(
                levels=int(key),
                kind=str(coder.get("kind")),
                symbols=int(coder.get("symbols", 0)),
                stream_bytes=stored,
                entropy_bits=entropy.entropy_bits(hist),
            )
        )
    return rows


def _info_rows(payload: Mapping, entries: dict) -> list[PackedTensorInfo]:
    rows = []
    for name, entry in entries.items():
        if "tied" in entry:
            target = entries.get(entry["tied"], {})
            shape = target.get("shape") or list(payload.get(entry["tied"], np.zeros(0)).shape)
            rows.append(
                PackedTensorInfo(
                    name, tuple(shape), "tied", None, f"tied to {entry['tied']}", 0, None
                )
            )
            continue
        if "raw" in entry:
            array = payload.get(name, np.zeros(0))
            rows.append(
                PackedTensorInfo(
                    name, tuple(array.shape), str(entry["raw"]), None, "raw", array.nbytes, None
                )
            )
            continue
        shape = _shape(name, entry)
        spec = _spec(name, entry)
        numel = math.prod(shape)
        side = sum(int(payload[f"{name}{_SEP}{k}"].nbytes) for k in ("offset", "scale"))
        if entry.get("coding") == "bitpack":
            code_bytes = float(payload[f"{name}{_SEP}codes"].nbytes)
        else:
            code_bytes = _int(entry.get("code_bits"), f"{name}: code_bits", 0, 16 * numel) / 8
        rows.append(
            PackedTensorInfo(
                name,
                shape,
                str(entry.get("dtype")),
                spec,
                str(entry.get("coding")),
                int(round(side + code_bytes)),
                8 * code_bytes / numel if numel else 0.0,
            )
        )
    return rows
