"""Packed files: exact round trips, real sizes, integrity against damaged files, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import compressor
from compressor import coding
from compressor.packed import PackedFormatError, load_packed, packed_info, save_packed
from compressor.spec import QuantSpec


class Zoo(nn.Module):
    """Every supported layer type, with a tied embedding and fp32 norms and biases."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(60, 24)
        self.lstm = nn.LSTM(24, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(32, 12, batch_first=True)
        self.cell = nn.LSTMCell(12, 12)
        self.conv = nn.Conv1d(12, 24, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.LayerNorm(24)
        self.generator = nn.Linear(24, 60)
        self.generator.weight = self.embedding.weight

    def forward(self, tokens):
        h, _ = self.lstm(self.embedding(tokens))
        h, _ = self.gru(h)
        c, _ = self.cell(h[:, -1])
        h = self.conv(h.transpose(1, 2)).transpose(1, 2) + c[:, None, :].repeat(1, 1, 2)
        h = h + self.conv2(h[:, None]).mean(1)
        return self.generator(self.norm(h))


TOKENS = torch.randint(0, 60, (3, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["uniform", "nonuniform"])
@pytest.mark.parametrize("entropy", [None, "huffman", "ans"])
@pytest.mark.parametrize("materialize", [False, True])
def test_round_trip_is_exact(tmp_path, method, entropy, materialize):
    torch.manual_seed(0)
    model = Zoo()
    compressor.quantize_(model, compressor.QuantConfig(bits=3, bucket_size=100, method=method))
    if materialize:
        compressor.materialize_(model)
    model.eval()
    with torch.no_grad():
        expected = model(TOKENS)
        values = compressor.quantized_state_dict(model)
    save_packed(model, tmp_path / "m.qd", metadata={"arch": "zoo"}, entropy=entropy)
    state, metadata = load_packed(tmp_path / "m.qd")
    assert metadata == {"arch": "zoo"}
    assert set(state) == set(values)
    for name, value in values.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert state["generator.weight"] is state["embedding.weight"]
    fresh = Zoo()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(TOKENS), expected)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("bucket", [None, 7, 256])
def test_every_bit_width_and_bucket(tmp_path, bits, bucket):
    x = torch.randn(33, 17)
    spec = QuantSpec("uniform", bits, bucket)
    q = spec.quantize(x)
    save_packed({"w": q, "step": torch.tensor(3)}, tmp_path / "w.qd", specs={"w": spec})
    state, _ = load_packed(tmp_path / "w.qd")
    assert torch.equal(state["w"], q) and torch.equal(state["step"], torch.tensor(3))


def test_other_dtypes_round_trip(tmp_path):
    tensors = {
        "half": torch.randn(10).half(),
        "bf16": torch.randn(10).bfloat16(),
        "ints": torch.arange(5),
        "flag": torch.tensor([True, False]),
        "q16": compressor.quantize_tensor(torch.randn(300).half(), 4, 256),
    }
    save_packed(tensors, tmp_path / "t.qd", specs={"q16": QuantSpec("uniform", 4, 256)})
    state, _ = load_packed(tmp_path / "t.qd")
    for name, value in tensors.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


def test_values_off_the_grid_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not on the uniform 4-bit grid"):
        save_packed(
            {"w": torch.randn(100)}, tmp_path / "w.qd", specs={"w": QuantSpec("uniform", 4)}
        )
    assert not (tmp_path / "w.qd").exists()


def _bias_free_mlp(widths):
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths, widths[1:])]
    return nn.Sequential(*layers)


def test_size_goals(tmp_path):
    torch.manual_seed(0)
    model = _bias_free_mlp([512, 512, 512, 256])
    fp32_file = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fp32_file)
    compressor.quantize_(model, compressor.QuantConfig(bits=4, bucket_size=256))
    size = save_packed(model, tmp_path / "m.qd")
    assert size == (tmp_path / "m.qd").stat().st_size
    weights = sum(p.numel() for p in model.parameters())
    theoretical = weights * 4 / 8 + 8 * (weights // 256)
    assert size <= 1.02 * theoretical
    assert fp32_file.stat().st_size / size >= 7.3


def test_entropy_coded_payload_is_near_the_entropy(tmp_path):
    torch.manual_seed(0)
    # Heavy-tailed weights: most codes sit in the middle levels, so entropy < bits.
    model = _bias_free_mlp([512, 512, 256])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.distributions.StudentT(3.0).sample(p.shape) * 0.02)
    compressor.quantize_(model, compressor.QuantConfig(bits=4, bucket_size=256))
    codes = np.concatenate(
        [
            q.encode(m.parametrizations[t].original).codes.numpy()
            for _, m, t, q in compressor.quantized_tensors(model)
        ]
    )
    entropy = coding.entropy_bits(np.bincount(codes, minlength=16))
    assert entropy < 3.9
    for coder, slack in (("huffman", 0.05), ("ans", 0.01)):
        save_packed(model, tmp_path / f"{coder}.qd", entropy=coder)
        rows = [r for r in packed_info(tmp_path / f"{coder}.qd") if r.spec is not None]
        mean = sum(r.code_bits * np.prod(r.shape) for r in rows) / codes.size
        assert entropy <= mean + 1e-6 and mean - entropy <= slack, (coder, mean, entropy)


def test_huffman_is_optimal_on_dyadic_histograms():
    counts = np.array([8, 4, 2, 1, 1])
    lengths = coding.huffman_lengths(counts)
    assert lengths.tolist() == [1, 2, 3, 4, 4]
    symbols = np.repeat(np.arange(5), counts)
    data, chunks = coding.huffman_encode(symbols, lengths)
    assert np.array_equal(coding.huffman_decode(data, chunks, lengths, symbols.size), symbols)


def test_huffman_lengths_are_bounded():
    counts = np.array([2**i for i in range(40)], dtype=np.int64)
    lengths = coding.huffman_lengths(counts)
    assert lengths.max() <= coding.HUFFMAN_MAX_LENGTH and (lengths > 0).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 3 * coding.HUFFMAN_CHUNK), st.integers(0, 2**31))
def test_bit_packing_and_huffman_round_trip(bits, count, seed):
    rng = np.random.default_rng(seed)
    symbols = rng.integers(0, 2**bits, count).astype(np.uint8)
    assert np.array_equal(coding.unpack_bits(coding.pack_bits(symbols, bits), bits, count), symbols)
    hist = np.bincount(symbols, minlength=2**bits)
    lengths = coding.huffman_lengths(hist)
    data, chunks = coding.huffman_encode(symbols, lengths)
    assert np.array_equal(coding.huffman_decode(data, chunks, lengths, count), symbols)


# ---------------------------------------------------------------------------------------------
# Integrity.


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 20))
    compressor.quantize_(model, compressor.QuantConfig(bits=3, bucket_size=64))
    files = {}
    for entropy in (None, "huffman", "ans"):
        path = folder / f"{entropy}.qd"
        save_packed(model, path, entropy=entropy)
        files[entropy] = path.read_bytes()
    return folder, files


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:  # bit flips
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, len(buf)))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # truncation
        buf = buf[: int(rng.integers(0, len(buf)))]
    elif kind == 2:  # digits in the JSON header changed (shapes, sizes, code lengths)
        header_len = int.from_bytes(buf[:8], "little")
        digits = [i for i in range(8, min(8 + header_len, len(buf))) if chr(buf[i]).isdigit()]
        for i in rng.choice(digits, size=min(3, len(digits)), replace=False):
            buf[i] = ord(str(int(rng.integers(0, 10))))
    else:  # random bytes spliced in
        i = int(rng.integers(0, len(buf)))
        buf[i:i] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    return bytes(buf)


def test_mutated_files_raise_packed_format_error(small_files):
    folder, files = small_files
    rng = np.random.default_rng(0)
    path = folder / "mutant.qd"
    outcomes = {"error": 0, "loaded": 0}
    for i in range(3000):
        original = files[(None, "huffman", "ans")[i % 3]]
        mutant = _mutate(original, rng)
        path.write_bytes(mutant)
        try:
            load_packed(path)
            outcomes["loaded"] += 1
        except PackedFormatError:
            outcomes["error"] += 1
    # A mutation can be harmless only where it leaves the bytes that count intact.
    assert outcomes["error"] > 2500, outcomes


def test_hostile_headers(tmp_path, small_files):
    _, files = small_files
    data = files[None]
    huge = (2**60).to_bytes(8, "little") + data[8:]
    cases = {
        "empty": b"",
        "short": b"\x01\x02",
        "huge header": huge,
        "not json": (12).to_bytes(8, "little") + b"not json at ",
        "a pickle": b"\x80\x04\x95" + b"\x00" * 64,
    }
    for label, blob in cases.items():
        path = tmp_path / f"{label}.qd"
        path.write_bytes(blob)
        with pytest.raises(PackedFormatError):
            load_packed(path)


def test_a_declared_size_out_of_proportion_is_refused(tmp_path):
    spec = QuantSpec("uniform", 4, None)
    save_packed({"w": spec.quantize(torch.randn(8))}, tmp_path / "w.qd", specs={"w": spec})
    data = (tmp_path / "w.qd").read_bytes()
    hostile = data.replace(b'\\"shape\\":[8]', b'\\"shape\\":[999999999999]')
    assert hostile != data
    (tmp_path / "w.qd").write_bytes(hostile)
    with pytest.raises(PackedFormatError):
        load_packed(tmp_path / "w.qd")


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    model = nn.Linear(40, 40)
    compressor.quantize_(model, compressor.QuantConfig())
    target = tmp_path / "m.qd"
    save_packed(model, target)
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save_packed(model, target, entropy="huffman")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qd"]


# ---------------------------------------------------------------------------------------------
# CLI.


def _qdistill(*args, cwd):
    exe = Path(sys.executable).with_name("qdistill")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_pack_inspect_unpack(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ck.pt")
    done = _qdistill(
        "pack", "ck.pt", "-o", "ck.qd", "--bits", "4", "--entropy", "huffman", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    shown = _qdistill("inspect", "ck.qd", cwd=tmp_path)
    assert shown.returncode == 0 and "0.weight" in shown.stdout and "huffman" in shown.stdout
    assert "compression" in shown.stdout
    for out in ("plain.pt", "plain.safetensors"):
        assert _qdistill("unpack", "ck.qd", "-o", out, cwd=tmp_path).returncode == 0
    state = torch.load(tmp_path / "plain.pt", weights_only=True)
    expected = compressor.quantize_tensor(model.state_dict()["0.weight"], 4, 256)
    assert torch.equal(state["0.weight"], expected)
    assert torch.equal(state["0.bias"], model.state_dict()["0.bias"])


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from compressor.packed_cli import pack_checkpoint

    folder = tmp_path_factory.mktemp("cli")
    state = nn.Linear(8, 8).state_dict()
    torch.save(state, folder / "ck.pt")
    pack_checkpoint(state, folder / "ck.qd")
    (folder / "junk.pt").write_bytes(b"definitely not a checkpoint")
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (("pack", "missing.pt", "-o", "x.qd"), "no such file: missing.pt"),
        (("pack", "ck.pt", "-o", "x.qd", "--bits", "9"), "--bits must be from 1 to 8"),
        (("pack", "ck.pt", "-o", "x.qd", "--include", "nothing"), "no tensor selected"),
        (("pack", "junk.pt", "-o", "x.qd"), "not a PyTorch checkpoint"),
        (("inspect", "ck.pt"), "not a safetensors file"),
        (("unpack", "ck.pt", "-o", "x.pt"), "not a safetensors file"),
        (("unpack", "ck.qd", "-o", "x.bin"), "must end in .pt or .safetensors"),
    ],
)
def test_cli_errors_are_one_line(cli_files, args, message):
    done = _qdistill(*args, cwd=cli_files)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
