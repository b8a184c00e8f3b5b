"""Packed model files: quantized tensors stored as their codes, really small on disk.

The container is safetensors (no pickle anywhere on the load path). A quantized tensor ``w``
is stored as ``w::offset`` and ``w::scale`` (fp32, one per bucket; on the int4 kernel grid its
bf16 zero and scale, kept as their 16 bits, since format version 3) plus its codes: either
``w::codes``, bit-packed at its bit width, or its share of one entropy-coded stream pooled over
every tensor with the same number of levels (``::<levels>::stream``, Huffman or rANS under one
histogram). Any other tensor is stored as it is; tied tensors once. The metadata holds the
format version, each tensor's shape, dtype and :class:`QuantSpec`, the coders' tables, a
SHA-256 over the metadata and every payload byte, and the user's metadata.

A tensor that the loading side rebuilds exactly (a deterministic buffer such as a sinusoidal
position encoding, which the model's constructor recreates) can be left out: the metadata keeps
its name, shape, dtype and why, and loading puts a placeholder in its place (a ``meta`` tensor,
no data) for the framework's adapter to fill (format version 4). Which tensors qualify is not
this module's business: the writer's caller decides, having checked that the rebuild is exact.

Loading validates every declared size against the bytes present before allocating, so a
truncated, corrupted or hostile file raises :class:`PackedFormatError` instead of crashing,
hanging or allocating out of proportion to the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.format import bitpack, entropy
from compressor.format.files import atomic_write_bytes
from compressor.quantization.grids import BucketCodes
from compressor.quantization.record import INT4_KERNEL, QuantSpec

FORMAT = "qdistill-packed"
VERSION = 4
"""The newest format version. Version 3 added the int4 kernel grid (a bf16 zero and scale per
bucket), version 4 tensors left out to be rebuilt at load. A file is written at the lowest
version that describes it (2 when it has neither), so that older readers take what they can."""
READ_VERSIONS = (2, 3, 4)
ENTROPY_CODERS = (None, "huffman", "ans")
_SEP = "::"
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
    coding: str  # "raw", "bitpack", "huffman", "ans", "tied to <name>" or "rebuilt"
    stored_bytes: int
    code_bits: float | None  # mean bits per weight of the codes (None for raw tensors)
    rebuilt: str = ""  # left out of the file: why, and what rebuilds it at load


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


def _encode_checked(name: str, value: torch.Tensor, spec: QuantSpec, given) -> BucketCodes:
    """Codes for ``value``, verified to decode to exactly its bits."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: the tensor holds NaN or infinite values (did training diverge?)")
    encoded = given if given is not None else spec.encode(value)
    decoded = spec.decode(encoded, value.shape, value.dtype)
    if not torch.equal(decoded, value):
        how = (
            "pack the quantized (parametrized) model or its training checkpoint with shadow "
            "weights instead"
            if not spec.reencodes
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
    rebuilt: Mapping[str, str] | None = None,
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
        rebuilt: ``{name: why}`` for tensors of the state dict to leave out because the
            loading side rebuilds them exactly (deterministic buffers): only their shape,
            dtype and the reason are kept, and loading gives a ``meta`` placeholder. The
            caller vouches for the rebuild; nothing here can check it.
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
    rebuilt = _checked_rebuilt(rebuilt or {}, tensors, specs)

    payload: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    first_of_storage: dict[tuple, str] = {}
    all_codes: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or _SEP in name:
            raise ValueError(f"tensor name {name!r} is empty or contains {_SEP!r} (reserved)")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: only tensors can be packed, got {type(value).__name__}")
        if name in rebuilt:  # shape and dtype only: a placeholder from a loaded file will do
            entries[name] = {
                "rebuilt": rebuilt[name],
                "shape": list(value.shape),
                "dtype": _dtype_name(value.dtype),
            }
            continue
        if value.is_meta:
            raise ValueError(
                f"{name}: a placeholder without data (a tensor rebuilt at load?): rebuild it "
                "first, or list it in rebuilt"
            )
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
        for part in ("offset", "scale"):
            numbers = getattr(encoded, part).detach().cpu().float().contiguous()
            if spec.method == INT4_KERNEL:  # bf16 values: their 16 bits, exactly
                numbers = numbers.to(torch.bfloat16).view(torch.int16)
            payload[f"{name}{_SEP}{part}"] = numbers.numpy()
        all_codes[name] = encoded.codes.contiguous().numpy().astype(np.uint8, copy=False)
        entries[name] = {
            "shape": list(value.shape),
            "dtype": _dtype_name(value.dtype),
            "spec": spec.to_dict(),
        }

    coders = _store_codes(all_codes, specs, payload, entries, entropy)
    kernel_grid = any(specs[n].method == INT4_KERNEL for n in all_codes)
    version = 4 if rebuilt else 3 if kernel_grid else 2
    header = {
        "format": FORMAT,
        "version": str(version),
        "tensors": _json(entries),
        "coders": _json(coders),
        "user": user,
    }
    header.update(_module_versions_field(state_dict))
    header["checksum"] = _checksum(header, payload)
    return _write_atomic(path, payload, header)


def _checked_rebuilt(
    rebuilt: Mapping[str, str], tensors: Mapping[str, object], specs: Mapping[str, QuantSpec]
) -> dict[str, str]:
    """The tensors to leave out, each a floating-point tensor of the state dict with a reason."""
    if not isinstance(rebuilt, Mapping):
        raise TypeError(f"rebuilt must map tensor names to reasons, got {type(rebuilt).__name__}")
    for name, why in rebuilt.items():
        if name not in tensors:
            raise ValueError(f"rebuilt names {name!r}, which is not in the state dict")
        if name in specs:
            raise ValueError(f"{name}: either quantized (specs) or rebuilt at load, not both")
        if not isinstance(why, str) or not why.strip():
            raise ValueError(f"{name}: say why it is rebuilt at load (a non-empty string)")
        value = tensors[name]
        if not isinstance(value, torch.Tensor) or _dtype_name(value.dtype) not in _DTYPES:
            raise ValueError(f"{name}: only floating-point tensors can be rebuilt at load")
    return dict(rebuilt)


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
        if kind == "ans":
            stream = entropy.ans_encode(symbols, hist)
            code_length = -np.log2(np.maximum(hist, 1) / max(int(hist.sum()), 1))
            if not entropy.ans_fits(symbols.size, hist, stream.size):
                # Too many weights for the bits stored (a near-single-symbol histogram, or a
                # long run of the first symbol at the end, which rANS codes almost for free):
                # the loader would refuse the stream. Huffman spends at least one bit each.
                kind = "huffman"
        coder["kind"] = kind
        if kind == "huffman":
            lengths = entropy.huffman_lengths(hist)
            stream, chunks = entropy.huffman_encode(symbols, lengths)
            payload[f"{_SEP}{key}{_SEP}chunks"] = chunks
            coder.update(lengths=lengths.tolist(), chunk=entropy.HUFFMAN_CHUNK)
            code_length = lengths
        payload[f"{_SEP}{key}{_SEP}stream"] = stream
        coders[key] = coder
        for name in names:
            entries[name]["coding"] = kind
            entries[name]["coder"] = key
            # This tensor's share of the stream, for reports (whole bits, or ideal for rANS).
            share = np.bincount(all_codes[name], minlength=levels)[:levels] @ code_length
            entries[name]["code_bits"] = int(round(float(share)))
    return coders


def _write_atomic(path: str | os.PathLike, payload: dict[str, np.ndarray], header: dict) -> int:
    from safetensors.numpy import save

    return atomic_write_bytes(path, save(payload, metadata=header))


# --------------------------------------------------------------------------------------------
# Loading. Every field of the metadata and every payload tensor is untrusted. ``_layout``
# checks them all (types, ranges, cross-references, each size against the bytes present and
# every coder's symbol count against what its stream can plausibly hold) before anything is
# decoded, so that a hostile file raises PackedFormatError, and loading any file allocates at
# most a small multiple of its own size plus the tensors it declares, which are themselves
# bounded by its payload: 8/bits weights a byte bit-packed, 8 Huffman-coded, and
# ``entropy.ANS_MAX_SYMBOLS_PER_BIT * 8`` rANS-coded.

_CODINGS = ("bitpack", "huffman", "ans")
_MAX_NDIM = 16
_HISTOGRAM_BLOCK = 1 << 16  # bincount widens to int64: 512 KB at a time


@dataclass(frozen=True)
class _Entry:
    """One validated tensor entry of the metadata."""

    name: str
    kind: str  # "tied", "raw", "quantized" or "rebuilt"
    target: str = ""  # tied: the tensor it shares
    dtype: str = ""  # raw: the stored dtype; quantized: the decoded one; rebuilt: its dtype
    shape: tuple[int, ...] = ()
    spec: QuantSpec | None = None
    coding: str = ""  # quantized: one of _CODINGS
    coder: str = ""  # entropy-coded: the key of its coder
    code_bits: int = 0  # entropy-coded: its share of the stream, for reports
    why: str = ""  # rebuilt: why it was left out, and what rebuilds it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Coder:
    """One validated pooled entropy coder of the metadata."""

    key: str
    levels: int
    kind: str
    names: tuple[str, ...]
    symbols: int
    counts: np.ndarray
    lengths: np.ndarray | None = None  # Huffman
    chunk: int = 0  # Huffman


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


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PackedFormatError(
            f"{what} must be an integer from {low} to {high}, got {_show(value)}"
        )
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise PackedFormatError(f"{what} must be a string, got {_show(value)}")
    return value


def _ints(value: object, what: str, length: int, low: int, high: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != length:
        raise PackedFormatError(f"{what} must be a list of {length} integers, got {_show(value)}")
    return np.array([_int(v, what, low, high) for v in value], dtype=np.int64)


def _array(
    payload: Mapping[str, np.ndarray], key: str, dtype: type, size: int | None = None
) -> np.ndarray:
    if key not in payload:
        raise PackedFormatError(f"missing tensor {key!r}")
    array = payload[key]
    if array.dtype != dtype or array.ndim != 1:
        raise PackedFormatError(f"{key} must be 1-D {np.dtype(dtype).name}")
    if size is not None and array.size != size:
        raise PackedFormatError(f"{key} holds {array.size} values, the metadata needs {size}")
    return array


def _parse_header(header: Mapping[str, str]) -> tuple[dict, dict, dict]:
    if header.get("format") != FORMAT:
        raise PackedFormatError(f"not a qdistill packed file (no '{FORMAT}' marker)")
    if header.get("version") not in [str(v) for v in READ_VERSIONS]:
        raise PackedFormatError(
            f"format version {_show(header.get('version'))}; this qdistill reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )
    parsed = []
    for field in ("tensors", "coders", "user"):
        try:
            value = json.loads(header[field])
        except KeyError:
            raise PackedFormatError(f"damaged metadata (no {field!r} field)") from None
        except (ValueError, RecursionError) as exc:
            raise PackedFormatError(f"damaged metadata ({field}: {exc})") from None
        if not isinstance(value, dict):
            raise PackedFormatError(f"damaged metadata ({field} must be an object)")
        parsed.append(value)
    return parsed[0], parsed[1], parsed[2]


def _fields(what: str, value: dict, allowed: set[str]) -> None:
    """Every field this version writes is checked; one it does not write is damage."""
    unexpected = sorted(set(value) - allowed, key=str)
    if unexpected:
        raise PackedFormatError(f"{what}: unexpected field(s) {_show(unexpected)}")


def _shape(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_NDIM:
        raise PackedFormatError(f"{name}: shape must be a list of at most {_MAX_NDIM} sizes")
    return tuple(_int(d, f"{name}: shape", 0, _MAX_DIM) for d in value)


def _spec(name: str, data: object) -> QuantSpec:
    from compressor.quantization.grids import MAX_BITS
    from compressor.quantization.record import SPEC_METHODS

    if not isinstance(data, dict):
        raise PackedFormatError(f"{name}: spec must be an object, got {_show(data)}")
    _fields(f"{name}: spec", data, {"method", "bits", "bucket_size", "points"})
    method = data.get("method")
    if method not in SPEC_METHODS:
        raise PackedFormatError(f"{name}: spec method must be one of {SPEC_METHODS}")
    bits = _int(data.get("bits"), f"{name}: spec bits", 1, MAX_BITS)
    bucket_size = data.get("bucket_size")
    if bucket_size is not None:
        _int(bucket_size, f"{name}: spec bucket_size", 1, _MAX_DIM)
    points = data.get("points")
    if points is not None:
        if not isinstance(points, list) or not 1 <= len(points) <= 2**bits:
            raise PackedFormatError(f"{name}: spec points must be a list of 1 to {2**bits}")
        for p in points:
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise PackedFormatError(f"{name}: quantization point {_show(p)} not in [0, 1]")
        points = tuple(float(p) for p in points)
    try:
        return QuantSpec(method, bits, bucket_size, points)
    except ValueError as exc:
        raise PackedFormatError(f"{name}: invalid quantization spec ({exc})") from None


def _entry(name: object, value: object) -> _Entry:
    if not isinstance(name, str) or not name or _SEP in name:
        raise PackedFormatError(f"invalid tensor name {_show(name)}")
    if not isinstance(value, dict):
        raise PackedFormatError(f"{name}: entry must be an object, got {_show(value)}")
    if "tied" in value:
        _fields(name, value, {"tied"})
        return _Entry(name, "tied", target=_str(value["tied"], f"{name}: tied"))
    if "raw" in value:
        _fields(name, value, {"raw"})
        return _Entry(name, "raw", dtype=_str(value["raw"], f"{name}: raw dtype"))
    if "rebuilt" in value:
        _fields(name, value, {"rebuilt", "shape", "dtype"})
        shape = _shape(name, value.get("shape"))
        if math.prod(shape) > _MAX_DIM:
            raise PackedFormatError(f"{name}: a rebuilt tensor of {math.prod(shape)} values")
        dtype = value.get("dtype")
        if dtype not in _DTYPES:
            raise PackedFormatError(
                f"{name}: dtype must be one of {sorted(_DTYPES)}, got {_show(dtype)}"
            )
        why = _str(value["rebuilt"], f"{name}: rebuilt")
        return _Entry(name, "rebuilt", dtype=dtype, shape=shape, why=why)
    coded = value.get("coding") in ("huffman", "ans")
    _fields(
        name,
        value,
        {"shape", "dtype", "spec", "coding"} | ({"coder", "code_bits"} if coded else set()),
    )
    shape = _shape(name, value.get("shape"))
    dtype = value.get("dtype")
    if dtype not in _DTYPES:
        raise PackedFormatError(
            f"{name}: dtype must be one of {sorted(_DTYPES)}, got {_show(dtype)}"
        )
    spec = _spec(name, value.get("spec"))
    coding = value.get("coding")
    if coding not in _CODINGS:
        raise PackedFormatError(f"{name}: coding must be one of {_CODINGS}, got {_show(coding)}")
    if coding == "bitpack":
        return _Entry(name, "quantized", dtype=dtype, shape=shape, spec=spec, coding=coding)
    numel = math.prod(shape)
    return _Entry(
        name,
        "quantized",
        dtype=dtype,
        shape=shape,
        spec=spec,
        coding=coding,
        coder=_str(value.get("coder"), f"{name}: coder"),
        code_bits=_int(value.get("code_bits"), f"{name}: code_bits", 0, 16 * numel),
    )


def _coder(key: object, value: object, entries: Mapping[str, _Entry], payload: Mapping) -> _Coder:
    from compressor.quantization.grids import MAX_BITS

    if not (
        isinstance(key, str)
        and 0 < len(key) <= 3
        and key.isascii()
        and key.isdigit()
        and key == str(int(key))
    ):
        raise PackedFormatError(f"damaged coder entry {_show(key)}")
    levels = _int(int(key), "a coder's number of levels", 1, 2**MAX_BITS)
    if not isinstance(value, dict):
        raise PackedFormatError(f"coder {key}: must be an object, got {_show(value)}")
    kind = value.get("kind")
    if kind not in ("huffman", "ans"):
        raise PackedFormatError(f"coder {key}: unknown kind {_show(kind)}")
    huffman = {"lengths", "chunk"} if kind == "huffman" else set()
    _fields(f"coder {key}", value, {"kind", "tensors", "symbols", "counts"} | huffman)
    names = value.get("tensors")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise PackedFormatError(f"coder {key}: invalid tensor list")
    for name in names:
        entry = entries.get(name)
        if entry is None or entry.coding != kind or entry.coder != key:
            raise PackedFormatError(f"coder {key}: lists {name!r}, which does not use it")
        if entry.spec.num_levels != levels:
            raise PackedFormatError(f"coder {key}: {name} has {entry.spec.num_levels} levels")
    symbols = sum(entries[n].numel for n in names)
    if _int(value.get("symbols"), f"coder {key}: symbols", 1, symbols) != symbols:
        raise PackedFormatError(
            f"coder {key}: {value.get('symbols')} symbols, its tensors hold {symbols}"
        )
    counts = _ints(value.get("counts"), f"coder {key}: counts", levels, 0, symbols)
    if int(counts.sum()) != symbols:
        raise PackedFormatError(f"coder {key}: histogram of {counts.sum()} for {symbols} symbols")
    stream_key = f"{_SEP}{key}{_SEP}stream"
    if kind == "ans":
        words = _array(payload, stream_key, np.uint32)
        if not entropy.ans_fits(symbols, counts, words.size):
            raise PackedFormatError(
                f"coder {key}: {symbols} weights claimed from a {4 * words.size}-byte rANS "
                f"stream, which holds at most {entropy.ans_max_symbols(counts, words.size)}"
            )
        return _Coder(key, levels, kind, tuple(names), symbols, counts)
    lengths = _ints(value.get("lengths"), f"coder {key}: lengths", levels, 0, 64)
    try:
        lengths = entropy.check_lengths(lengths, levels)
    except entropy.CodingError as exc:
        raise PackedFormatError(f"coder {key}: {exc}") from None
    if ((counts > 0) & (lengths == 0)).any():
        raise PackedFormatError(f"coder {key}: a counted symbol has no Huffman code")
    chunk = _int(value.get("chunk"), f"coder {key}: chunk", 1, 1 << 16)
    stream = _array(payload, stream_key, np.uint8)
    _array(payload, f"{_SEP}{key}{_SEP}chunks", np.uint32, -(-symbols // chunk))
    if symbols > 8 * stream.size:
        raise PackedFormatError(f"coder {key}: {symbols} weights in {stream.size} bytes")
    return _Coder(key, levels, kind, tuple(names), symbols, counts, lengths, chunk)


def _layout(header: Mapping[str, str], payload: Mapping) -> tuple[dict, dict, dict]:
    """The validated entries, coders and user metadata; nothing decoded yet."""
    raw_entries, raw_coders, user = _parse_header(header)
    if header.get("checksum") != _checksum(header, payload):
        raise PackedFormatError("checksum mismatch: the file is corrupted")
    entries = {name: _entry(name, value) for name, value in raw_entries.items()}
    expected = set()
    for e in entries.values():
        if e.kind == "tied":
            target = entries.get(e.target)
            if target is None or target.kind in ("tied", "rebuilt"):
                what = "missing" if target is None else f"itself {target.kind}"
                what = "itself" if e.target == e.name else f"{e.target!r}, which is {what}"
                raise PackedFormatError(f"{e.name} is tied to {what}")
        elif e.kind == "raw":
            _raw_array(e, payload)
            expected.add(e.name)
        elif e.kind == "rebuilt":
            if header.get("version") in ("2", "3"):
                raise PackedFormatError(
                    f"{e.name}: a tensor rebuilt at load in a version-{header['version']} file"
                )
        else:
            if e.spec.method == INT4_KERNEL and header.get("version") == "2":
                raise PackedFormatError(f"{e.name}: an int4_kernel tensor in a version-2 file")
            buckets = e.spec.num_buckets(e.numel)
            stored = np.int16 if e.spec.method == INT4_KERNEL else np.float32
            for part in ("offset", "scale"):
                _array(payload, f"{e.name}{_SEP}{part}", stored, buckets)
                expected.add(f"{e.name}{_SEP}{part}")
            if e.coding == "bitpack":
                key = f"{e.name}{_SEP}codes"
                _array(payload, key, np.uint8, bitpack.packed_nbytes(e.numel, e.spec.bits))
                expected.add(key)
            elif e.coder not in raw_coders:
                raise PackedFormatError(f"{e.name}: no coder {e.coder!r} in the file")
    coders = {}
    for key, value in raw_coders.items():
        coders[key] = _coder(key, value, entries, payload)
        expected.update(f"{_SEP}{key}{_SEP}{part}" for part in ("stream", "chunks"))
    for e in entries.values():
        if e.coder and e.name not in coders[e.coder].names:
            raise PackedFormatError(f"{e.name}: not listed by its coder {e.coder}")
    unexpected = sorted(set(payload) - expected)
    if unexpected:
        raise PackedFormatError(f"payload tensors the metadata does not describe: {unexpected[:3]}")
    return entries, coders, user


def _histogram(symbols: np.ndarray, levels: int) -> np.ndarray:
    counts = np.zeros(levels, dtype=np.int64)
    for start in range(0, symbols.size, _HISTOGRAM_BLOCK):
        found = np.bincount(symbols[start : start + _HISTOGRAM_BLOCK], minlength=levels)
        if found.size > levels:
            raise PackedFormatError(f"an index beyond the {levels} levels")
        counts += found
    return counts


def _decode_pooled(coder: _Coder, entries: Mapping, payload: Mapping) -> dict[str, np.ndarray]:
    """Decode one pooled entropy-coded stream and cut it into its tensors' codes."""
    stream = payload[f"{_SEP}{coder.key}{_SEP}stream"]
    try:
        if coder.kind == "huffman":
            chunks = payload[f"{_SEP}{coder.key}{_SEP}chunks"]
            symbols = entropy.huffman_decode(
                stream, chunks, coder.lengths, coder.symbols, coder.chunk
            )
        else:
            if not entropy.ans_available():
                raise PackedFormatError("the file is rANS-coded; install 'constriction' to read it")
            symbols = entropy.ans_decode(stream, coder.counts, coder.symbols)
    except entropy.CodingError as exc:
        raise PackedFormatError(f"coder {coder.key}: {exc}") from None
    if not np.array_equal(_histogram(symbols, coder.levels), coder.counts):
        raise PackedFormatError(f"coder {coder.key}: the stream does not match its histogram")
    out, start = {}, 0
    for name in coder.names:
        numel = entries[name].numel
        out[name] = symbols[start : start + numel]
        start += numel
    return out


def _bucket_numbers(entry: _Entry, payload: Mapping, part: str) -> torch.Tensor:
    """A tensor's per-bucket offsets or scales as fp32 (bf16 bits widened exactly)."""
    numbers = torch.from_numpy(payload[f"{entry.name}{_SEP}{part}"].copy())
    if entry.spec.method == INT4_KERNEL:
        numbers = numbers.view(torch.bfloat16).float()
    return numbers


def _entry_codes(entry: _Entry, payload: Mapping, pooled: Mapping) -> BucketCodes:
    spec = entry.spec
    if entry.coding == "bitpack":
        try:
            codes = bitpack.unpack_bits(payload[f"{entry.name}{_SEP}codes"], spec.bits, entry.numel)
        except bitpack.BitPackError as exc:
            raise PackedFormatError(f"{entry.name}: {exc}") from None
    else:
        codes = pooled[entry.name]
    if codes.size and int(codes.max()) >= spec.num_levels:
        raise PackedFormatError(f"{entry.name}: a code exceeds the {spec.num_levels} levels")
    return BucketCodes(
        torch.from_numpy(np.ascontiguousarray(codes)),
        _bucket_numbers(entry, payload, "offset"),
        _bucket_numbers(entry, payload, "scale"),
    )


def _quantized_tensor(entry: _Entry, payload: Mapping, pooled: Mapping) -> torch.Tensor:
    encoded = _entry_codes(entry, payload, pooled)
    return entry.spec.decode(encoded, entry.shape, _DTYPES[entry.dtype])


def _raw_array(entry: _Entry, payload: Mapping) -> np.ndarray:
    if entry.name not in payload:
        raise PackedFormatError(f"missing tensor {entry.name!r}")
    array = payload[entry.name]
    if entry.dtype == "bfloat16":
        if array.dtype != np.int16:
            raise PackedFormatError(f"{entry.name}: bfloat16 tensors are stored as int16 bits")
    elif entry.dtype != str(array.dtype):
        raise PackedFormatError(
            f"{entry.name}: dtype {array.dtype} but metadata says {_show(entry.dtype)}"
        )
    return array


def _raw_tensor(entry: _Entry, payload: Mapping) -> torch.Tensor:
    tensor = torch.from_numpy(_raw_array(entry, payload).copy())
    return tensor.view(torch.bfloat16) if entry.dtype == "bfloat16" else tensor


def _load(payload: Mapping, header: Mapping) -> tuple[dict, dict]:
    entries, coders, user = _layout(header, payload)
    pooled: dict[str, np.ndarray] = {}
    for coder in coders.values():
        pooled.update(_decode_pooled(coder, entries, payload))
    state: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        if entry.kind == "raw":
            state[name] = _raw_tensor(entry, payload)
        elif entry.kind == "quantized":
            state[name] = _quantized_tensor(entry, payload, pooled)
            pooled.pop(name, None)  # its codes are no longer needed
        elif entry.kind == "rebuilt":  # no data: the adapter that loads the model fills it
            state[name] = torch.empty(entry.shape, dtype=_DTYPES[entry.dtype], device="meta")
    for name, entry in entries.items():
        if entry.kind == "tied":
            state[name] = state[entry.target]
    return {name: state[name] for name in entries}, user


def _guarded(path: object, work):
    """Run ``work``; any error a malformed file can cause becomes a PackedFormatError."""
    try:
        return work()
    except PackedFormatError as exc:
        raise PackedFormatError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        # A safety net: _layout checks every field, so reaching here is a loader bug.
        raise PackedFormatError(f"{path}: damaged metadata ({type(exc).__name__}: {exc})") from None
    except (RuntimeError, ArithmeticError) as exc:  # torch refusing a shape or size
        raise PackedFormatError(f"{path}: inconsistent tensor ({exc})") from None


def load_packed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a packed file: the state dict (quantized tensors decoded exactly to the values the
    model was evaluated with; tied tensors shared again; tensors left out to be rebuilt at load
    as ``meta`` placeholders of their shape and dtype, ``tensor.is_meta``, which the framework
    adapter fills; an OrderedDict with the ``_metadata`` module versions of the state dict it
    was written from) and the user metadata.

    Raises :class:`PackedFormatError` (saying what is wrong) for any file that is not a
    valid packed file, and ``FileNotFoundError`` for a missing one."""
    payload, header = _read(path)
    state, user = _guarded(path, lambda: _load(payload, header))
    return _guarded(path, lambda: _with_module_versions(state, header.get(_MODULE_VERSIONS))), user


@dataclass(frozen=True)
class PackedCodes:
    """One quantized tensor of a packed file as stored: its spec, shape, decoded dtype and
    codes (the per-bucket numbers widened to fp32)."""

    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: BucketCodes


def load_packed_codes(
    path: str | os.PathLike, names: set[str] | None = None
) -> dict[str, PackedCodes]:
    """The codes of a packed file's quantized tensors (all, or those ``names`` lists), not
    decoded to values: what a runtime that executes codes needs. Tied names are included and
    share their target's codes. Validated as :func:`load_packed` validates."""
    payload, header = _read(path)

    def quantized(entries: Mapping[str, _Entry], name: str) -> bool:
        e = entries[name]
        return e.kind == "quantized" or (e.kind == "tied" and entries[e.target].kind == "quantized")

    def work() -> dict[str, PackedCodes]:
        entries, coders, _ = _layout(header, payload)
        wanted = [n for n in entries if (names is None or n in names) and quantized(entries, n)]
        target = {n: entries[n].target if entries[n].kind == "tied" else n for n in wanted}
        pooled: dict[str, np.ndarray] = {}
        for coder in coders.values():
            if set(target.values()) & set(coder.names):
                pooled.update(_decode_pooled(coder, entries, payload))
        found = {}
        for name in set(target.values()):
            e = entries[name]
            codes = _entry_codes(e, payload, pooled)
            found[name] = PackedCodes(e.spec, e.shape, _DTYPES[e.dtype], codes)
        return {n: found[target[n]] for n in wanted}

    return _guarded(path, work)


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
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def packed_specs(path: str | os.PathLike) -> dict[str, QuantSpec]:
    """The quantization spec of every quantized tensor in a packed file."""
    return {i.name: i.spec for i in packed_info(path) if i.spec is not None}


def packed_info(path: str | os.PathLike) -> list[PackedTensorInfo]:
    """Per-tensor storage of a packed file, without decoding it."""
    return packed_summary(path)[0]


def packed_summary(path: str | os.PathLike) -> tuple[list[PackedTensorInfo], list[PackedCoderInfo]]:
    """Per-tensor storage and per-coder statistics of a packed file, without decoding it
    (every field validated as :func:`load_packed` does)."""
    payload, header = _read(path)

    def summary() -> tuple[list[PackedTensorInfo], list[PackedCoderInfo]]:
        entries, coders, _ = _layout(header, payload)
        return _info_rows(payload, entries), _coder_rows(payload, coders)

    return _guarded(path, summary)


def _coder_rows(payload: Mapping, coders: Mapping[str, _Coder]) -> list[PackedCoderInfo]:
    rows = []
    for key, coder in sorted(coders.items(), key=lambda item: item[1].levels):
        stored = sum(
            int(payload[k].nbytes)
            for k in (f"{_SEP}{key}{_SEP}stream", f"{_SEP}{key}{_SEP}chunks")
            if k in payload
        )
        rows.append(
            PackedCoderInfo(
                levels=coder.levels,
                kind=coder.kind,
                symbols=coder.symbols,
                stream_bytes=stored,
                entropy_bits=entropy.entropy_bits(coder.counts),
            )
        )
    return rows


def _info_rows(payload: Mapping, entries: Mapping[str, _Entry]) -> list[PackedTensorInfo]:
    rows = []
    for name, entry in entries.items():
        if entry.kind == "tied":
            target = entries[entry.target]
            shape = target.shape if target.kind == "quantized" else payload[target.name].shape
            rows.append(
                PackedTensorInfo(
                    name, tuple(shape), "tied", None, f"tied to {entry.target}", 0, None
                )
            )
        elif entry.kind == "raw":
            array = payload[name]
            rows.append(
                PackedTensorInfo(
                    name, tuple(array.shape), entry.dtype, None, "raw", int(array.nbytes), None
                )
            )
        elif entry.kind == "rebuilt":
            rows.append(
                PackedTensorInfo(
                    name, entry.shape, entry.dtype, None, "rebuilt", 0, None, rebuilt=entry.why
                )
            )
        else:
            numel = entry.numel
            side = sum(int(payload[f"{name}{_SEP}{k}"].nbytes) for k in ("offset", "scale"))
            if entry.coding == "bitpack":
                code_bytes = float(payload[f"{name}{_SEP}codes"].nbytes)
            else:
                code_bytes = entry.code_bits / 8
            rows.append(
                PackedTensorInfo(
                    name,
                    entry.shape,
                    entry.dtype,
                    entry.spec,
                    entry.coding,
                    int(round(side + code_bytes)),
                    8 * code_bytes / numel if numel else 0.0,
                )
            )
    return rows
