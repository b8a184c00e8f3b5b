"""Packed model files: quantized tensors stored as their codes, really small on disk.

The container is safetensors (no pickle anywhere on the load path). A quantized tensor ``w``
is stored as ``w::codes`` (bit-packed at its bit width, or entropy coded), ``w::offset`` and
``w::scale`` (fp32, one per bucket); any other tensor is stored as it is. The metadata holds
the format version, each tensor's shape, dtype and :class:`QuantSpec`, the entropy coders'
histograms, a SHA-256 of the payload, and the user's metadata.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import coding
from compressor.api import materialized_codes, quantization_specs, quantized_tensors
from compressor.quantizers import BucketCodes
from compressor.spec import QuantSpec

FORMAT = "qdistill-packed"
VERSION = 1
ENTROPY_CODERS = (None, "huffman", "ans")
_SEP = "::"
# An rANS stream may not claim more than this many weights per stored bit.
_MAX_WEIGHTS_PER_BIT = 256

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
    coding: str  # "raw", "bitpack", "huffman" or "ans"
    stored_bytes: int
    code_bits: float | None  # mean bits per weight of the codes (None for raw tensors)


# --------------------------------------------------------------------------------------------
# Saving.


def _tensors_and_specs(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    specs: Mapping[str, QuantSpec] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantSpec], dict[str, BucketCodes]]:
    """Plain-named tensors to store, the specs of the quantized ones, and codes encoded from
    the shadow weights where a parametrized model provides them."""
    from compressor.api import quantized_state_dict

    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        tensors = quantized_state_dict(model)
        found = quantization_specs(model)
        encoded = materialized_codes(model)
        for name, module, tensor_name, quantizer in quantized_tensors(model):
            with torch.no_grad():
                encoded[name] = quantizer.encode(module.parametrizations[tensor_name].original)
        return tensors, {**found, **(specs or {})}, encoded
    tensors = dict(model_or_state_dict)
    return tensors, dict(specs or {}), {}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _checksum(payload: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(payload):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(payload[key]).view(np.uint8).tobytes())
    return digest.hexdigest()


def _encode_checked(name: str, value: torch.Tensor, spec: QuantSpec, given) -> BucketCodes:  # noqa: ANN001
    if given is not None and torch.equal(spec.decode(given, value.shape, value.dtype), value):
        return given
    encoded = spec.encode(value)  # exact for uniform grids (re-quantizing is idempotent)
    if not torch.equal(spec.decode(encoded, value.shape, value.dtype), value):
        raise ValueError(
            f"{name}: the tensor is not on the {spec.method} {spec.bits}-bit grid of bucket size "
            f"{spec.bucket_size}; pack the quantized (parametrized) model or its training "
            f"checkpoint with shadow weights instead"
        )
    return encoded


def save_packed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    specs: Mapping[str, QuantSpec] | None = None,
    entropy: str | None = None,
) -> int:
    """Write a packed model file; returns its size in bytes.

    Args:
        model_or_state_dict: a quantized model (parametrized or materialized) or a state dict.
        path: where to write; the file appears there complete or not at all.
        metadata: JSON-serialisable data stored alongside (architecture, vocabulary, ...).
        specs: ``{name: QuantSpec}`` for quantized tensors of a plain state dict (for a model
            they are read from it).
        entropy: None (codes bit-packed at their width), "huffman" (the paper's code over the
            pooled histogram) or "ans" (rANS, at the entropy bound; needs ``constriction``).
    """
    if entropy not in ENTROPY_CODERS:
        raise ValueError(f"entropy must be one of {ENTROPY_CODERS}, got {entropy!r}")
    if entropy == "ans" and not coding.ans_available():
        raise ValueError("entropy='ans' needs the 'constriction' package: pip install constriction")
    tensors, specs, given_codes = _tensors_and_specs(model_or_state_dict, specs)
    unknown = sorted(set(specs) - set(tensors))
    if unknown:
        raise ValueError(f"specs name tensors that are not in the state dict: {unknown[:5]}")

    payload: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    first_of_storage: dict[tuple, str] = {}
    all_codes: dict[str, tuple[np.ndarray, int]] = {}
    for name, value in tensors.items():
        if _SEP in name:
            raise ValueError(f"tensor name {name!r} contains {_SEP!r}, which the format reserves")
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
            payload[name] = value.contiguous().numpy() if value.dtype != torch.bfloat16 else None
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16: keep its bits
                payload[name] = value.contiguous().view(torch.int16).numpy()
            entries[name] = {"raw": str(value.dtype).removeprefix("torch.")}
            continue
        if str(value.dtype).removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"{name}: quantized tensors must be floating point, got {value.dtype}")
        encoded = _encode_checked(name, value, spec, given_codes.get(name))
        payload[f"{name}{_SEP}offset"] = encoded.offset.numpy()
        payload[f"{name}{_SEP}scale"] = encoded.scale.numpy()
        all_codes[name] = (encoded.codes.numpy(), spec.num_levels)
        entries[name] = {
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "spec": spec.to_dict(),
        }

    coders = _store_codes(all_codes, specs, payload, entries, entropy)
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "tensors": _json(entries),
        "coders": _json(coders),
        "user": _json(dict(metadata or {})),
        "checksum": _checksum(payload),
    }
    return _write_atomic(path, payload, header)


def _store_codes(
    all_codes: dict[str, tuple[np.ndarray, int]],
    specs: Mapping[str, QuantSpec],
    payload: dict[str, np.ndarray],
    entries: dict[str, dict],
    entropy: str | None,
) -> dict[str, dict]:
    """Bit-pack or entropy-code every tensor's codes; one histogram per alphabet size."""
    coders: dict[str, dict] = {}
    if entropy is not None:
        histograms: dict[int, np.ndarray] = {}
        for codes, levels in all_codes.values():
            hist = histograms.setdefault(levels, np.zeros(levels, dtype=np.int64))
            hist += np.bincount(codes, minlength=levels)[:levels]
        for levels, hist in histograms.items():
            if entropy == "huffman":
                coders[str(levels)] = {
                    "kind": "huffman",
                    "lengths": coding.huffman_lengths(hist).tolist(),
                }
            else:
                coders[str(levels)] = {"kind": "ans", "counts": hist.tolist()}
    for name, (codes, levels) in all_codes.items():
        coder = coders.get(str(levels))
        if coder is None:
            payload[f"{name}{_SEP}codes"] = coding.pack_bits(codes, specs[name].bits)
            entries[name]["coding"] = "bitpack"
        elif coder["kind"] == "huffman":
            data, chunks = coding.huffman_encode(codes, np.asarray(coder["lengths"]))
            payload[f"{name}{_SEP}codes"] = data
            payload[f"{name}{_SEP}chunks"] = chunks
            entries[name]["coding"] = "huffman"
        else:
            payload[f"{name}{_SEP}codes"] = coding.ans_encode(codes, np.asarray(coder["counts"]))
            entries[name]["coding"] = "ans"
        entries[name]["coder"] = str(levels)
    return coders


def _write_atomic(path: str | os.PathLike, payload: dict[str, np.ndarray], header: dict) -> int:
    from safetensors.numpy import save

    path = Path(path)
    data = save(payload, metadata=header)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
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


def _read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], int]:
    from safetensors.numpy import load

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    try:
        payload = load(data)
    except Exception as exc:  # safetensors reports malformed headers in its own error type
        raise PackedFormatError(f"{path}: not a safetensors file ({exc})") from None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise PackedFormatError(f"{path}: unreadable safetensors metadata ({exc})") from None
    return payload, header, len(data)


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
    except (KeyError, ValueError) as exc:
        raise PackedFormatError(f"{path}: damaged metadata ({exc})") from None
    if not all(isinstance(x, dict) for x in (entries, coders, user)):
        raise PackedFormatError(f"{path}: damaged metadata (wrong types)")
    return entries, coders, user


def _shape(path: object, name: str, entry: dict) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise PackedFormatError(f"{path}: {name}: invalid shape {shape!r}")
    return tuple(shape)


def _array(path: object, payload: Mapping[str, np.ndarray], key: str, dtype: type) -> np.ndarray:
    if key not in payload:
        raise PackedFormatError(f"{path}: missing tensor {key!r}")
    array = payload[key]
    if array.dtype != dtype or array.ndim != 1:
        raise PackedFormatError(f"{path}: {key} must be 1-D {np.dtype(dtype).name}")
    return array


def _decode_codes(
    path: object,
    name: str,
    entry: dict,
    coders: dict,
    payload: Mapping,
    numel: int,
    spec: QuantSpec,
) -> np.ndarray:
    kind = entry.get("coding")
    stored = payload.get(f"{name}{_SEP}codes")
    if kind == "bitpack":
        data = _array(path, payload, f"{name}{_SEP}codes", np.uint8)
        codes = coding.unpack_bits(data, spec.bits, numel)
    else:
        coder = coders.get(str(entry.get("coder")))
        if not isinstance(coder, dict) or coder.get("kind") != kind:
            raise PackedFormatError(f"{path}: {name}: missing or mismatched {kind!r} coder")
        if kind == "huffman":
            data = _array(path, payload, f"{name}{_SEP}codes", np.uint8)
            lengths = np.asarray(coder.get("lengths"), dtype=np.int64)
            if lengths.shape != (spec.num_levels,):
                raise PackedFormatError(f"{path}: {name}: Huffman table has the wrong size")
            if numel > 8 * data.size:
                raise PackedFormatError(f"{path}: {name}: {numel} weights in {data.size} bytes")
            chunks = _array(path, payload, f"{name}{_SEP}chunks", np.uint32)
            codes = coding.huffman_decode(data, chunks, lengths, numel)
        elif kind == "ans":
            if not coding.ans_available():
                raise PackedFormatError(f"{path}: rANS-coded; install 'constriction' to read it")
            words = _array(path, payload, f"{name}{_SEP}codes", np.uint32)
            counts = np.asarray(coder.get("counts"), dtype=np.int64)
            if counts.shape != (spec.num_levels,) or counts.min(initial=0) < 0 or not counts.sum():
                raise PackedFormatError(f"{path}: {name}: invalid rANS histogram")
            if numel > _MAX_WEIGHTS_PER_BIT * 32 * max(words.size, 1):
                raise PackedFormatError(f"{path}: {name}: {numel} weights in {words.size} words")
            codes = coding.ans_decode(words, counts, numel)
        else:
            raise PackedFormatError(f"{path}: {name}: unknown coding {kind!r}")
    del stored
    if codes.size and int(codes.max()) >= spec.num_levels:
        raise PackedFormatError(f"{path}: {name}: a code exceeds the {spec.num_levels} levels")
    return codes


def _quantized_tensor(
    path: object, name: str, entry: dict, coders: dict, payload: Mapping
) -> torch.Tensor:
    shape = _shape(path, name, entry)
    numel = math.prod(shape)
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise PackedFormatError(f"{path}: {name}: unsupported dtype {entry.get('dtype')!r}")
    try:
        spec = QuantSpec.from_dict(entry["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackedFormatError(f"{path}: {name}: invalid quantization spec ({exc})") from None
    offset = _array(path, payload, f"{name}{_SEP}offset", np.float32)
    scale = _array(path, payload, f"{name}{_SEP}scale", np.float32)
    if offset.size != spec.num_buckets(numel) or scale.size != offset.size:
        raise PackedFormatError(
            f"{path}: {name}: {offset.size} buckets stored, shape {list(shape)} with bucket "
            f"size {spec.bucket_size} needs {spec.num_buckets(numel)}"
        )
    try:
        codes = _decode_codes(path, name, entry, coders, payload, numel, spec)
    except coding.CodingError as exc:
        raise PackedFormatError(f"{path}: {name}: {exc}") from None
    encoded = BucketCodes(
        torch.from_numpy(codes), torch.from_numpy(offset.copy()), torch.from_numpy(scale.copy())
    )
    return spec.decode(encoded, shape, dtype)


def _raw_tensor(path: object, name: str, dtype_name: object, payload: Mapping) -> torch.Tensor:
    if name not in payload:
        raise PackedFormatError(f"{path}: missing tensor {name!r}")
    array = payload[name]
    if dtype_name == "bfloat16":
        if array.dtype != np.int16:
            raise PackedFormatError(f"{path}: {name}: bfloat16 tensors are stored as int16 bits")
        return torch.from_numpy(array.copy()).view(torch.bfloat16)
    if dtype_name != str(array.dtype) and not (dtype_name == "bool" and array.dtype == np.bool_):
        raise PackedFormatError(
            f"{path}: {name}: dtype {array.dtype} but metadata says {dtype_name}"
        )
    return torch.from_numpy(array.copy())


def load_packed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a packed file: the state dict (quantized tensors decoded exactly to the values the
    model was evaluated with; tied tensors shared again) and the user metadata."""
    payload, header, _ = _read(path)
    entries, coders, user = _parse_header(path, header)
    if header.get("checksum") != _checksum(payload):
        raise PackedFormatError(f"{path}: checksum mismatch: the file is corrupted")
    state: dict[str, torch.Tensor] = {}
    ties = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise PackedFormatError(f"{path}: {name}: damaged entry")
        try:
            if "tied" in entry:
                ties[name] = entry["tied"]
            elif "raw" in entry:
                state[name] = _raw_tensor(path, name, entry["raw"], payload)
            else:
                state[name] = _quantized_tensor(path, name, entry, coders, payload)
        except PackedFormatError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            # Every field of the metadata is untrusted: a malformed one is a damaged file.
            raise PackedFormatError(f"{path}: {name}: damaged entry ({exc})") from None
    for name, target in ties.items():
        if not isinstance(target, str) or target not in state:
            raise PackedFormatError(f"{path}: {name} is tied to missing tensor {target!r}")
        state[name] = state[target]
    return {name: state[name] for name in entries}, user


def packed_specs(path: str | os.PathLike) -> dict[str, QuantSpec]:
    """The quantization spec of every quantized tensor in a packed file."""
    return {i.name: i.spec for i in packed_info(path) if i.spec is not None}


def packed_info(path: str | os.PathLike) -> list[PackedTensorInfo]:
    """Per-tensor storage of a packed file, without decoding it."""
    payload, header, _ = _read(path)
    entries, _, _ = _parse_header(path, header)
    try:
        return _info_rows(path, payload, entries)
    except PackedFormatError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        raise PackedFormatError(f"{path}: damaged metadata ({exc})") from None


def _info_rows(path: object, payload: Mapping, entries: dict) -> list[PackedTensorInfo]:
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
        shape = _shape(path, name, entry)
        spec = QuantSpec.from_dict(entry["spec"])
        stored = sum(int(a.nbytes) for k, a in payload.items() if k.startswith(f"{name}{_SEP}"))
        code_bytes = sum(
            int(payload[k].nbytes)
            for k in (f"{name}{_SEP}codes", f"{name}{_SEP}chunks")
            if k in payload
        )
        numel = math.prod(shape)
        rows.append(
            PackedTensorInfo(
                name,
                shape,
                str(entry.get("dtype")),
                spec,
                str(entry.get("coding")),
                stored,
                8 * code_bytes / numel if numel else 0.0,
            )
        )
    return rows
