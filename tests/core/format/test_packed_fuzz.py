"""Damaged and hostile packed files: every one raises PackedFormatError (or loads, when the
damage is harmless), quickly, without crashing or allocating out of proportion.

Two mutators: raw byte damage (bit flips, truncation, splices, header digits), which the
checksum and safetensors catch; and re-signed edits of the metadata and payload (the checksum
recomputed, as an attacker would), which only the loader's own validation can catch. Every
field of the metadata is also replaced, one at a time, by values of the wrong type, through
the Python API and the ``qdistill inspect``/``unpack`` commands. A subprocess measures the
peak memory that loading crafted files takes.

    QDISTILL_FUZZ_SECONDS=600 pytest tests/test_packed_fuzz.py -k campaign -s   # long run
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

import compressor
from compressor import save_packed
from compressor.format import entropy
from compressor.format.packed import (
    PackedFormatError,
    _checksum,
    load_packed,
    packed_info,
    packed_summary,
)
from compressor.quantization.record import QuantSpec

HOSTILE_NUMBERS = [0, 1, -1, 7, 255, 256, 2**16, 2**31, 2**40, 2**63, 10**30, 1.5, None, "x", []]
# Values of the wrong type or range for any metadata field.
WRONG_VALUES = [
    "3",
    "",
    "x",
    "0.weight",
    [],
    [1, 2],
    ["x"],
    {},
    {"a": 1},
    None,
    True,
    -1,
    -(2**40),
    2**64,
    0.5,
    float("nan"),
    float("inf"),
]


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


def _edit_json(value, rng):
    """A random edit somewhere inside a parsed JSON value."""
    if isinstance(value, dict) and value:
        key = list(value)[int(rng.integers(0, len(value)))]
        action = rng.integers(0, 4)
        if action == 0:
            del value[key]
        elif action == 1:
            pool = HOSTILE_NUMBERS + WRONG_VALUES + list(value)  # names: ties to other tensors
            value[key] = pool[int(rng.integers(0, len(pool)))]
        elif action == 2 and rng.integers(0, 4) == 0:  # renamed: references to it dangle
            value[f"{key}{'x' if rng.integers(0, 2) else ''}"] = value.pop(key)
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
        if signed and i % 4 == 1:  # the report reads the same metadata
            with contextlib.suppress(PackedFormatError):
                packed_summary(path)
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


def _resigned(data: bytes, edit) -> bytes:
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

    def huge(header, payload):
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


# --------------------------------------------------------------------------------------------
# Every metadata field replaced by a value of the wrong type (issue 15, item 11).


def _places(value, prefix=()):
    """Every dict value and the first item of every list inside a parsed JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _places(item, (*prefix, key))
    elif isinstance(value, list) and value:
        yield (*prefix, 0)
        yield from _places(value[0], (*prefix, 0))


def _set(value, place, new):
    for step in place[:-1]:
        value = value[step]
    value[place[-1]] = new


def _metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len])["__metadata__"]


def _edit_field(field: str, change):
    """A re-signing edit that applies ``change`` to the parsed JSON of one metadata field."""

    def edit(header, payload):
        value = json.loads(header[field])
        header[field] = json.dumps(change(value))

    return edit


def _wrong_type_mutants(data: bytes):
    """(label, file bytes) for every field of 'tensors' and 'coders' set to each wrong value,
    and tied entries pointing anywhere."""
    header = _metadata(data)
    for field in ("tensors", "coders"):
        parsed = json.loads(header[field])
        for place in _places(parsed):
            for new in WRONG_VALUES:

                def change(value, place=place, new=new):
                    _set(value, place, new)
                    return value

                yield f"{field}{list(place)}={new!r}", _resigned(data, _edit_field(field, change))
    tensors = json.loads(header["tensors"])
    first = next(iter(tensors))
    quantized = next(n for n, e in tensors.items() if "spec" in e)
    raw = next((n for n, e in tensors.items() if "raw" in e), quantized)
    ties = {
        "a missing tensor": {"tied": "no.such.tensor"},
        "itself": {"tied": first},
        "a tied tensor": {"tied": "extra"},
        "a number": {"tied": 3},
        "a list": {"tied": [quantized]},
        "a tensor, and raw": {"tied": quantized, "raw": "float32"},
    }
    for label, entry in ties.items():
        for bad_shapes in (False, True):

            def change(value, entry=entry, bad_shapes=bad_shapes):
                value[first] = entry
                value["extra"] = {"tied": first}
                if bad_shapes:  # shapes that a report would multiply
                    value[raw]["shape"] = ["a", "b"]
                    value[quantized]["shape"] = "ab"
                return value

            mutant = _resigned(data, _edit_field("tensors", change))
            yield f"tied to {label}{', bad shapes' if bad_shapes else ''}", mutant


def _assert_clean_exit(argv: list[str], label: str) -> None:
    """``qdistill ARGV`` exits 0, or 2 with one line on stderr and no traceback."""
    from compressor.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    if code != 0:
        assert code == 2 and len(lines) == 1 and "error:" in lines[0], (label, argv, lines)


@pytest.mark.parametrize("which", [0, 2, 3])  # bit-packed + tied, rANS + tied, nonuniform
def test_wrongly_typed_metadata_fields_raise_packed_format_error(originals, tmp_path, which):
    """No value in any field of the metadata gives any exception but PackedFormatError, in
    the loader or in the report ``qdistill inspect`` prints; the commands exit 2, one line."""
    path = tmp_path / "mutant.qd"
    out = tmp_path / "out.pt"
    tried = refused = 0
    for n, (label, mutant) in enumerate(_wrong_type_mutants(originals[which])):
        path.write_bytes(mutant)
        tried += 1
        try:
            state, _ = load_packed(path)
            assert all(isinstance(v, torch.Tensor) for v in state.values()), label
        except PackedFormatError:
            refused += 1
        with contextlib.suppress(PackedFormatError):
            for row in packed_info(path):
                assert all(type(d) is int for d in row.shape), label
        if n % 5 == 0 or label.startswith("tied"):
            _assert_clean_exit(["inspect", str(path)], label)
            out.unlink(missing_ok=True)
            _assert_clean_exit(["unpack", str(path), "-o", str(out)], label)
    assert tried > 200 and refused > 0.9 * tried, (tried, refused)


def test_crafted_tied_entries_are_one_line_errors_of_the_installed_command(originals, tmp_path):
    """The reproduction: a tie to a tensor whose entry carries a shape of strings crashed
    ``qdistill inspect`` with a TypeError; a tensor tied to itself was listed as a tie."""
    messages = {"bad_shape": "1.bias: unexpected field(s) ['shape']", "to_itself": "tied to"}

    def bad_shape(value):
        value["extra"] = {"tied": "1.bias"}
        value["1.bias"]["shape"] = ["a", "b"]
        return value

    def to_itself(value):
        value["extra"] = {"tied": "extra"}
        return value

    exe = Path(sys.executable).with_name("qdistill")
    for edit in (bad_shape, to_itself):
        name = f"{edit.__name__}.qd"
        (tmp_path / name).write_bytes(_resigned(originals[0], _edit_field("tensors", edit)))
        for argv in (["inspect", name], ["unpack", name, "-o", "out.pt"]):
            done = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=tmp_path)
            assert done.returncode == 2, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert messages[edit.__name__] in done.stderr and "Traceback" not in done.stderr
        for read in (packed_info, load_packed):
            with pytest.raises(PackedFormatError, match=re.escape(messages[edit.__name__])):
                read(tmp_path / name)
    assert not (tmp_path / "out.pt").exists()


# --------------------------------------------------------------------------------------------
# Memory: a crafted file declares a huge tensor behind a tiny stream (issue 15, item 9).

_PROBE = r"""
import ctypes, gc, json, re, sys
from compressor.format.packed import PackedFormatError, load_packed

try:  # memory freed by an earlier case goes back to the system, not to the next case
    trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    trim = lambda pad: 0  # noqa: E731

def status(key):
    text = open("/proc/self/status").read()
    return 1024 * int(re.search(key + r":\s+(\d+)", text).group(1))

for path in sys.argv[2:]:
    load_packed(path)  # warm-up: lazy imports, decode tables, allocator pools
results = {}
for path in sys.argv[1].split(","):
    gc.collect()
    trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak RSS starts again from the current RSS
    before = status("VmRSS")
    try:
        state, _ = load_packed(path)
        weights = sum(v.numel() for v in state.values())
    except PackedFormatError:
        weights = -1
    results[path] = {"growth": status("VmHWM") - before, "weights": weights}
    state = None
print(json.dumps(results))
"""


def _tiny(folder: Path, coder: str | None, bits: int) -> Path:
    spec = QuantSpec("uniform", bits, None)
    path = folder / f"tiny-{coder}-{bits}.qd"
    save_packed({"w": spec.quantize(torch.randn(64))}, path, specs={"w": spec}, entropy=coder)
    return path


def _claim(levels: int, count: int, counts: list[int]):
    """An edit declaring ``w`` of ``count`` weights (and its coder, ``count`` symbols)."""

    def edit(header, payload):
        tensors, coders = json.loads(header["tensors"]), json.loads(header["coders"])
        tensors["w"]["shape"] = [count]
        if coders:
            coders[str(levels)].update(symbols=count, counts=counts)
        header["tensors"], header["coders"] = json.dumps(tensors), json.dumps(coders)

    return edit


def _memory_cases(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    words = 16_000  # a 64 KB stream, as in the issue's 66 KB file

    def issue(header, payload):
        count = 256 * 32 * words
        _claim(4, count, [count - 3, 1, 1, 1])(header, payload)
        payload["::4::stream"] = rng.integers(1, 2**32, words, dtype=np.uint32)

    def at_bound(header, payload):
        count = entropy.ans_max_symbols(np.array([10**6, 1, 1, 1]), words)
        _claim(4, count, [count - 3, 1, 1, 1])(header, payload)
        payload["::4::stream"] = rng.integers(1, 2**32, words, dtype=np.uint32)

    def huffman_garbage(header, payload):
        count, chunk = 8 * 4 * words, entropy.HUFFMAN_CHUNK
        _claim(2, count, [count // 2, count - count // 2])(header, payload)
        payload["::2::stream"] = rng.integers(0, 256, 4 * words, dtype=np.uint8)
        chunks = np.full(-(-count // chunk), chunk, dtype=np.uint32)
        chunks[-1] = count - (chunks.size - 1) * chunk
        payload["::2::chunks"] = chunks

    cases = {}
    for label, coder, bits, edit in (
        ("rANS, the issue's file", "ans", 2, issue),
        ("rANS at the bound", "ans", 2, at_bound),
        ("Huffman garbage", "huffman", 1, huffman_garbage),
        ("bit-packed huge shape", None, 1, _claim(2, 2**40, [])),
    ):
        path = _tiny(folder, coder, bits).rename(folder / f"{len(cases)}.qd")
        path.write_bytes(_resigned(path.read_bytes(), edit))
        cases[label] = path
    # Valid files as dense as each coding goes: rANS at ~0.27 bits a weight, Huffman and
    # 1-bit packing at 1 bit a weight.
    spec = QuantSpec("uniform", 1, None)
    sparse = spec.quantize(torch.from_numpy((rng.random(2_000_000) > 0.955).astype(np.float32)))
    dense = spec.quantize(torch.from_numpy((rng.random(500_000) > 0.5).astype(np.float32)))
    for label, coder, w in (("rANS", "ans", sparse), ("Huffman", "huffman", dense)):
        path = folder / f"valid-{coder}.qd"
        save_packed({"w": w}, path, specs={"w": spec}, entropy=coder)
        cases[f"valid {label}"] = path
    path = folder / "valid-bitpack.qd"
    save_packed({"w": dense}, path, specs={"w": spec})
    cases["valid bit-packed"] = path
    return cases


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset"
)
def test_loading_crafted_files_stays_within_a_memory_bound(tmp_path):
    """Peak RSS growth while loading is at most a constant (decode tables, fixed-size work
    blocks), plus a few bytes per weight that the file decodes to, plus a small multiple of
    the file's size; and what a file decodes to is bounded by its size. The issue's 64 KB
    file made the loader grow by about 500 MB before it refused the file."""
    cases = _memory_cases(tmp_path)
    warm = [_tiny(tmp_path, coder, 2) for coder in ("ans", "huffman", None)]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MALLOC_MMAP_THRESHOLD_": str(1 << 17),  # large blocks mapped, and unmapped when freed
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(map(str, cases.values())), *map(str, warm)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    report = []
    for label, path in cases.items():
        growth, weights = results[str(path)]["growth"], results[str(path)]["weights"]
        size = path.stat().st_size
        report.append(f"{label}: {size:,} B, +{growth / 2**20:.1f} MiB, {weights:,} weights")
        assert (weights > 0) == label.startswith("valid"), report  # crafted files refused
        decoded = max(weights, 0)
        # What a file holds is bounded by its size (rANS: 32 weights a byte at most).
        assert decoded <= 32 * size + entropy.ANS_FREE_SYMBOLS, report
        assert growth <= 24 * 2**20 + 16 * decoded + 32 * size, report
    print("\n".join(report))
