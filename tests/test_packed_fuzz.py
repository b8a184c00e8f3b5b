"""Damaged and hostile packed files: every one raises PackedFormatError (or loads, when the
damage is harmless), quickly, without crashing or allocating out of proportion.

Two mutators: raw byte damage (bit flips, truncation, splices, header digits), which the
checksum and safetensors catch; and re-signed edits of the metadata and payload (the checksum
recomputed, as an attacker would), which only the loader's own validation can catch.

    QDISTILL_FUZZ_SECONDS=600 pytest tests/test_packed_fuzz.py -k campaign -s   # long run
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

import compressor
from compressor import save_packed
from compressor.format.packed import PackedFormatError, _checksum, load_packed
from compressor.quantization.record import QuantSpec

HOSTILE_NUMBERS = [0, 1, -1, 7, 255, 256, 2**16, 2**31, 2**40, 2**63, 10**30, 1.5, None, "x", []]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 20), nn.LSTMCell(20, 8))
    model[1].weight = model[0].weight
    compressor.quantize_(model, compressor.QuantConfig(bits=3, bucket_size=64))
    nonuniform = nn.Linear(12, 10)
    compressor.quantize_(nonuniform, compressor.QuantConfig(bits=2, method="nonuniform"))
    files = []
    for source in (model, nonuniform):
        for coder in (None, "huffman", "ans"):
            path = folder / "f.qd"
            save_packed(source, path, metadata={"arch": "tiny"}, entropy=coder)
            files.append(path.read_bytes())
    return files


def _raw_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, len(buf)))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # truncation
        buf = buf[: int(rng.integers(0, len(buf)))]
    elif kind == 2:  # digits of the JSON header changed (shapes, offsets, lengths)
        header_len = int.from_bytes(buf[:8], "little")
        digits = [i for i in range(8, min(8 + header_len, len(buf))) if chr(buf[i]).isdigit()]
        for i in rng.choice(digits, size=min(3, len(digits)), replace=False):
            buf[i] = ord(str(int(rng.integers(0, 10))))
    elif kind == 3:  # random bytes spliced in
        i = int(rng.integers(0, len(buf)))
        buf[i:i] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    else:  # the declared header length changed
        buf[:8] = int(rng.choice([0, 1, 2**20, 2**62, len(buf), len(buf) - 9])).to_bytes(
            8, "little"
        )
    return bytes(buf)


def _edit_json(value, rng):  # noqa: ANN001, ANN202
    """A random edit somewhere inside a parsed JSON value."""
    if isinstance(value, dict) and value:
        key = list(value)[int(rng.integers(0, len(value)))]
        action = rng.integers(0, 4)
        if action == 0:
            del value[key]
        elif action == 1:
            value[key] = HOSTILE_NUMBERS[int(rng.integers(0, len(HOSTILE_NUMBERS)))]
        else:
            value[key] = _edit_json(value[key], rng)
        return value
    if isinstance(value, list) and value:
        i = int(rng.integers(0, len(value)))
        action = rng.integers(0, 4)
        if action == 0:
            del value[i]
        elif action == 1:
            value.append(value[i])
        else:
            value[i] = _edit_json(value[i], rng)
        return value
    if isinstance(value, str) and rng.integers(0, 2):
        return value[::-1]
    return HOSTILE_NUMBERS[int(rng.integers(0, len(HOSTILE_NUMBERS)))]


def _signed_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """Edit the metadata or a payload tensor and recompute the checksum."""
    payload = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])["__metadata__"]
    target = rng.integers(0, 3)
    if target == 0:  # metadata
        fields = ["tensors", "coders", "version", "format", "module_versions"]
        field = fields[int(rng.integers(0, len(fields)))]
        if field in ("tensors", "coders", "module_versions"):
            header[field] = json.dumps(_edit_json(json.loads(header[field]), rng))
        else:
            header[field] = str(_edit_json(header[field], rng))
    elif target == 1 and payload:  # a payload tensor resized, retyped or dropped
        key = list(payload)[int(rng.integers(0, len(payload)))]
        array = payload[key]
        action = rng.integers(0, 3)
        if action == 0:
            payload[key] = array.reshape(-1)[: int(rng.integers(0, array.size + 1))].copy()
        elif action == 1:
            payload[key] = np.frombuffer(array.tobytes() + b"\0" * 8, dtype=np.uint8).copy()
        else:
            del payload[key]
    else:  # payload bytes changed in place (decodes to other values or fails)
        key = list(payload)[int(rng.integers(0, len(payload)))]
        raw = bytearray(payload[key].tobytes())
        if raw:
            raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
        payload[key] = np.frombuffer(bytes(raw), dtype=payload[key].dtype).reshape(
            payload[key].shape
        )
    header["checksum"] = _checksum(header, payload)
    return st_save(payload, metadata=header)


def _campaign(originals, tmp_path, seconds: float, limit: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    path = tmp_path / "mutant.qd"
    outcomes = {"raw_error": 0, "raw_loaded": 0, "signed_error": 0, "signed_loaded": 0}
    slowest = 0.0
    deadline = time.monotonic() + seconds
    for i in range(limit):
        if time.monotonic() > deadline:
            break
        original = originals[i % len(originals)]
        signed = i % 2 == 1
        mutant = _signed_mutation(original, rng) if signed else _raw_mutation(original, rng)
        path.write_bytes(mutant)
        start = time.perf_counter()
        prefix = "signed" if signed else "raw"
        try:
            state, _ = load_packed(path)
            assert all(isinstance(v, torch.Tensor) for v in state.values())
            outcomes[f"{prefix}_loaded"] += 1
        except PackedFormatError:
            outcomes[f"{prefix}_error"] += 1
        slowest = max(slowest, time.perf_counter() - start)
    outcomes["slowest_load_s"] = slowest
    outcomes["total"] = sum(v for k, v in outcomes.items() if k != "slowest_load_s")
    return outcomes


def test_thousands_of_mutated_files_raise_packed_format_error(originals, tmp_path):
    outcomes = _campaign(originals, tmp_path, seconds=20, limit=3000, seed=0)
    assert outcomes["total"] >= 2000, outcomes
    # Raw damage is caught by the checksum unless it hits nothing that counts (rare).
    assert outcomes["raw_error"] >= 0.97 * (outcomes["raw_error"] + outcomes["raw_loaded"])
    assert outcomes["signed_error"] > 0 and outcomes["slowest_load_s"] < 5.0, outcomes


@pytest.mark.skipif(
    not os.environ.get("QDISTILL_FUZZ_SECONDS"), reason="long campaign: set QDISTILL_FUZZ_SECONDS"
)
def test_long_fuzz_campaign(originals, tmp_path):
    seconds = float(os.environ["QDISTILL_FUZZ_SECONDS"])
    outcomes = _campaign(originals, tmp_path, seconds=seconds, limit=10**9, seed=1)
    print(f"\nfuzz campaign: {outcomes}")
    assert outcomes["slowest_load_s"] < 5.0


def test_hostile_headers(tmp_path, originals):
    data = originals[0]
    cases = {
        "empty": b"",
        "short": b"\x01\x02",
        "huge header": (2**60).to_bytes(8, "little") + data[8:],
        "not json": (12).to_bytes(8, "little") + b"not json at ",
        "a pickle": b"\x80\x04\x95" + b"\x00" * 64,
        "a torch checkpoint": None,
    }
    torch.save({"w": torch.zeros(3)}, tmp_path / "ck.pt")
    cases["a torch checkpoint"] = (tmp_path / "ck.pt").read_bytes()
    for label, blob in cases.items():
        path = tmp_path / f"{label}.qd"
        path.write_bytes(blob)
        with pytest.raises(PackedFormatError):
            load_packed(path)
    with pytest.raises(PackedFormatError, match="directory"):
        load_packed(tmp_path)


def _resigned(data: bytes, edit) -> bytes:  # noqa: ANN001
    payload = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])["__metadata__"]
    edit(header, payload)
    header["checksum"] = _checksum(header, payload)
    return st_save(payload, metadata=header)


@pytest.mark.parametrize("coder", [None, "huffman", "ans"])
def test_huge_declared_sizes_are_refused_before_allocating(tmp_path, coder):
    spec = QuantSpec("uniform", 4, None)
    path = tmp_path / "w.qd"
    save_packed({"w": spec.quantize(torch.randn(64))}, path, specs={"w": spec}, entropy=coder)

    def huge(header, payload):  # noqa: ANN001
        tensors = json.loads(header["tensors"])
        tensors["w"]["shape"] = [2**40, 2**40]
        header["tensors"] = json.dumps(tensors)
        coders = json.loads(header["coders"])
        for c in coders.values():
            c["symbols"] = 2**80
        header["coders"] = json.dumps(coders)

    path.write_bytes(_resigned(path.read_bytes(), huge))
    start = time.perf_counter()
    with pytest.raises(PackedFormatError):
        load_packed(path)
    assert time.perf_counter() - start < 1.0


def test_checksum_catches_any_changed_metadata(tmp_path):
    spec = QuantSpec("uniform", 4, None)
    path = tmp_path / "w.qd"
    save_packed({"w": spec.quantize(torch.randn(8))}, path, specs={"w": spec})
    data = path.read_bytes()
    hostile = data.replace(b'\\"shape\\":[8]', b'\\"shape\\":[9]')
    assert hostile != data and len(hostile) == len(data)
    path.write_bytes(hostile)
    with pytest.raises(PackedFormatError, match="checksum"):
        load_packed(path)
