"""Packed files: exact round trips on every layer type, real sizes on disk, entropy coding
close to the entropy, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compressor
from compressor import save_packed
from compressor.format import bitpack, entropy
from compressor.format.packed import (
    PackedFormatError,
    load_packed,
    packed_info,
    packed_summary,
)
from compressor.quantization.record import QuantSpec


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
        self.deconv = nn.ConvTranspose1d(24, 24, 1)
        self.norm = nn.LayerNorm(24)
        self.generator = nn.Linear(24, 60)
        self.generator.weight = self.embedding.weight

    def forward(self, tokens):
        h, _ = self.lstm(self.embedding(tokens))
        h, _ = self.gru(h)
        c, _ = self.cell(h[:, -1])
        h = self.conv(h.transpose(1, 2)) + c[:, :, None].repeat(1, 2, 1)
        h = self.deconv(h).transpose(1, 2)
        h = h + self.conv2(h[:, None]).mean(1)
        return self.generator(self.norm(h))


TOKENS = torch.randint(0, 60, (3, 5), generator=torch.Generator().manual_seed(1))
QUANTIZED = {  # every quantized weight of Zoo, by layer type
    "embedding.weight",
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l1_reverse",
    "gru.weight_hh_l0",
    "cell.weight_ih",
    "conv.weight",
    "conv2.weight",
    "deconv.weight",
}


@pytest.mark.parametrize("method", ["uniform", "nonuniform"])
@pytest.mark.parametrize("coder", [None, "huffman", "ans"])
@pytest.mark.parametrize("materialize", [False, True])
def test_round_trip_is_exact_on_every_layer_type(tmp_path, method, coder, materialize):
    torch.manual_seed(0)
    model = Zoo()
    compressor.quantize_(model, compressor.QuantConfig(bits=3, bucket_size=100, method=method))
    if materialize:
        compressor.materialize_(model)
    model.eval()
    with torch.no_grad():
        expected = model(TOKENS)
        values = compressor.quantized_state_dict(model)
    save_packed(model, tmp_path / "m.qd", metadata={"arch": "zoo", "n": [1, 2]}, entropy=coder)
    state, metadata = load_packed(tmp_path / "m.qd")
    assert metadata == {"arch": "zoo", "n": [1, 2]}
    assert set(state) == set(values)
    for name, value in values.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert state["generator.weight"] is state["embedding.weight"]
    rows = {r.name: r for r in packed_info(tmp_path / "m.qd")}
    assert {n for n, r in rows.items() if r.spec is not None} >= QUANTIZED
    assert rows["norm.weight"].coding == "raw"
    fresh = Zoo()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(TOKENS), expected)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bit_width_bucket_and_method(tmp_path, bits):
    x = torch.randn(33, 17)  # 561 weights: buckets of 7 and 256 leave a partial bucket
    tensors, specs = {"step": torch.tensor(3)}, {}
    for bucket in (None, 7, 256):
        uniform = QuantSpec("uniform", bits, bucket)
        points = compressor.quantile_points(x, max(1, 2**bits - 1), bucket)
        nonuniform = QuantSpec.nonuniform(points, bucket)
        for label, spec in ((f"u{bucket}", uniform), (f"n{bucket}", nonuniform)):
            specs[label] = spec
            tensors[label] = spec.quantize(x)
    for coder in (None, "huffman", "ans"):
        try:
            save_packed(tensors, tmp_path / "w.qd", specs=specs, entropy=coder)
        except ValueError as exc:  # a non-uniform tensor that does not re-encode exactly
            assert "parametrized" in str(exc)
            continue
        state, _ = load_packed(tmp_path / "w.qd")
        for name, value in tensors.items():
            assert torch.equal(state[name], value), (name, coder)


def test_nonuniform_from_codes_is_exact_for_every_width(tmp_path):
    torch.manual_seed(0)
    for bits in range(1, 9):
        model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20))
        config = compressor.QuantConfig(bits=bits, bucket_size=64, method="nonuniform")
        compressor.quantize_(model, config)
        values = compressor.quantized_state_dict(model)
        save_packed(model, tmp_path / "n.qd", entropy="huffman" if bits % 2 else None)
        state, _ = load_packed(tmp_path / "n.qd")
        assert all(torch.equal(state[k], v) for k, v in values.items()), bits


def test_other_dtypes_and_empty_tensors_round_trip(tmp_path):
    tensors = {
        "half": torch.randn(10).half(),
        "bf16": torch.randn(10).bfloat16(),
        "ints": torch.arange(5),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "q16": compressor.quantize_tensor(torch.randn(300).half(), 4, 256),
        "qbf16": compressor.quantize_tensor(torch.randn(20, 20).bfloat16(), 2, 64),
        "qempty": torch.zeros(0, 4),
    }
    specs = {
        "q16": QuantSpec("uniform", 4, 256),
        "qbf16": QuantSpec("uniform", 2, 64),
        "qempty": QuantSpec("uniform", 3, 8),
    }
    for coder in (None, "huffman", "ans"):
        save_packed(tensors, tmp_path / "t.qd", specs=specs, entropy=coder)
        state, _ = load_packed(tmp_path / "t.qd")
        for name, value in tensors.items():
            assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


def test_values_off_the_grid_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not on the uniform 4-bit grid"):
        save_packed(
            {"w": torch.randn(100)}, tmp_path / "w.qd", specs={"w": QuantSpec("uniform", 4)}
        )
    with pytest.raises(ValueError, match="not in the state dict"):
        save_packed({"w": torch.randn(4)}, tmp_path / "w.qd", specs={"v": QuantSpec("uniform", 4)})
    assert list(tmp_path.iterdir()) == []


def _bias_free_mlp(widths):
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(widths, widths[1:])])


def test_size_goals(tmp_path):
    torch.manual_seed(0)
    model = _bias_free_mlp([512, 512, 512, 256])
    model[0] = nn.Linear(512, 512)  # a bias and an 8-bit layer keep it realistic
    fp32_file = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fp32_file)
    config = compressor.QuantConfig(bits=4, bucket_size=256, bits_overrides={r"^2$": 8})
    compressor.quantize_(model, config)
    size = save_packed(model, tmp_path / "m.qd", metadata={"arch": "mlp"})
    assert size == (tmp_path / "m.qd").stat().st_size
    specs = compressor.quantization_specs(model)
    state = compressor.quantized_state_dict(model)
    theoretical = sum(
        specs[k].theoretical_bytes(v.numel()) if k in specs else 4 * v.numel()
        for k, v in state.items()
    )
    assert size <= 1.02 * theoretical, (size, theoretical)


def test_a_mostly_4_bit_model_is_7_3_times_smaller_than_fp32(tmp_path):
    torch.manual_seed(0)
    model = _bias_free_mlp([512, 512, 512, 256])
    model[0] = nn.Linear(512, 512)  # biases stay fp32
    fp32_file = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fp32_file)
    compressor.quantize_(model, compressor.QuantConfig(bits=4, bucket_size=256))
    size = save_packed(model, tmp_path / "m.qd")
    assert fp32_file.stat().st_size / size >= 7.3


def _student_t_model(widths, df=4.0):
    torch.manual_seed(0)
    model = _bias_free_mlp(widths)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.distributions.StudentT(df).sample(p.shape) * 0.02)
    return model


def test_entropy_coded_payload_is_near_the_entropy(tmp_path):
    model = _student_t_model([512, 512, 256])  # heavy tails: most codes in the middle levels
    compressor.quantize_(model, compressor.QuantConfig(bits=4, bucket_size=256))
    codes = np.concatenate(
        [
            q.encode(m.parametrizations[t].original).codes.numpy()
            for _, m, t, q in compressor.quantized_tensors(model)
        ]
    )
    bound = entropy.entropy_bits(np.bincount(codes, minlength=16))
    assert bound < 3.7
    sizes = {}
    for coder, slack in (("huffman", 0.05), ("ans", 0.01)):
        sizes[coder] = save_packed(model, tmp_path / f"{coder}.qd", entropy=coder)
        (summary,) = packed_summary(tmp_path / f"{coder}.qd")[1]
        assert summary.symbols == codes.size
        assert abs(summary.entropy_bits - bound) < 1e-9
        # The real stored index payload (stream and chunk table), per weight.
        assert bound <= summary.mean_bits <= bound + slack, (coder, summary.mean_bits, bound)
    plain = save_packed(model, tmp_path / "plain.qd")
    assert sizes["ans"] < sizes["huffman"] < plain


def test_huffman_is_optimal_on_dyadic_histograms():
    counts = np.array([8, 4, 2, 1, 1])
    lengths = entropy.huffman_lengths(counts)
    assert lengths.tolist() == [1, 2, 3, 4, 4]
    assert entropy.mean_code_length(counts, lengths) == entropy.entropy_bits(counts)
    symbols = np.repeat(np.arange(5), counts)
    stream, chunks = entropy.huffman_encode(symbols, lengths, chunk=3)
    assert np.array_equal(entropy.huffman_decode(stream, chunks, lengths, 16, chunk=3), symbols)


def test_huffman_lengths_are_bounded():
    counts = np.array([2**i for i in range(40)], dtype=np.int64)
    lengths = entropy.huffman_lengths(counts)
    assert lengths.max() <= entropy.HUFFMAN_MAX_LENGTH and (lengths > 0).all()
    symbols = np.arange(40).repeat(3)
    stream, chunks = entropy.huffman_encode(symbols, lengths, chunk=16)
    decoded = entropy.huffman_decode(stream, chunks, lengths, symbols.size, chunk=16)
    assert np.array_equal(decoded, symbols)


def test_bit_packing_and_huffman_round_trip_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(60):
        bits = 1 + trial % 8
        count = int(rng.integers(0, 3 * entropy.HUFFMAN_CHUNK))
        probabilities = rng.dirichlet(np.full(2**bits, 0.3))
        symbols = rng.choice(2**bits, count, p=probabilities).astype(np.uint8)
        packed = bitpack.pack_bits(symbols, bits)
        assert packed.size == bitpack.packed_nbytes(count, bits)
        assert np.array_equal(bitpack.unpack_bits(packed, bits, count), symbols)
        hist = np.bincount(symbols, minlength=2**bits)
        lengths = entropy.huffman_lengths(hist)
        chunk = int(rng.choice([1, 5, 64, entropy.HUFFMAN_CHUNK]))
        stream, chunks = entropy.huffman_encode(symbols, lengths, chunk)
        assert stream.size * 8 - int(hist @ lengths) < 8
        decoded = entropy.huffman_decode(stream, chunks, lengths, count, chunk)
        assert np.array_equal(decoded, symbols), (bits, count, chunk)


def test_bit_packing_layout_is_a_little_endian_bit_stream():
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0, 5], dtype=np.uint8)
    packed = bitpack.pack_bits(codes, 3)
    stream = np.unpackbits(packed, bitorder="little")
    fields = [int("".join(map(str, stream[3 * i : 3 * i + 3][::-1])), 2) for i in range(9)]
    assert fields == codes.tolist() and packed.size == 4
    with pytest.raises(bitpack.BitPackError):
        bitpack.unpack_bits(packed[:-1], 3, 9)


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = nn.Linear(40, 40)
    compressor.quantize_(model, compressor.QuantConfig())
    target = tmp_path / "m.qd"
    save_packed(model, target)
    before = target.read_bytes()

    real_fdopen = os.fdopen

    class FailingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # half the bytes reach the disk, then...
            raise OSError("disk full")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        save_packed(model, target, entropy="huffman")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qd"]
    # A tensor that fails to encode half way through leaves nothing either.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="only tensors"):
        save_packed({"a": torch.zeros(3), "b": [1, 2]}, tmp_path / "new.qd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qd"]
    state, _ = load_packed(target)
    assert torch.equal(state["weight"], compressor.quantized_state_dict(model)["weight"])


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "absent.qd")
    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(PackedFormatError, match="not a qdistill packed file"):
        load_packed(tmp_path / "plain.safetensors")


def test_written_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0o600: a packed model is meant to be shared like any other file."""
    from compressor.format.files import default_file_mode

    spec = QuantSpec("uniform", 4, None)
    save_packed({"w": spec.quantize(torch.randn(8))}, tmp_path / "w.qd", specs={"w": spec})
    assert (tmp_path / "w.qd").stat().st_mode & 0o777 == default_file_mode()


# --------------------------------------------------------------------------------------------
# Bounded decoding (issue 15, item 9).


def test_decoders_work_in_bounded_blocks(tmp_path, monkeypatch):
    """Huffman expands, rANS decodes and the histogram check counts a block at a time: tiny
    blocks give the same, exact, result."""
    import compressor.format.packed as packed

    model = _student_t_model([300, 200, 120])
    compressor.quantize_(model, compressor.QuantConfig(bits=3, bucket_size=64))
    expected = {}
    for coder in ("huffman", "ans"):
        save_packed(model, tmp_path / f"{coder}.qd", entropy=coder)
        expected[coder], _ = load_packed(tmp_path / f"{coder}.qd")
    monkeypatch.setattr(entropy, "_EXPAND_CELLS", 50)
    monkeypatch.setattr(entropy, "_ANS_BLOCK", 1000)
    monkeypatch.setattr(packed, "_HISTOGRAM_BLOCK", 777)
    for coder in ("huffman", "ans"):
        state, _ = load_packed(tmp_path / f"{coder}.qd")
        assert all(torch.equal(state[k], v) for k, v in expected[coder].items())
    rng = np.random.default_rng(1)
    symbols = rng.choice(8, 20_000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01]).astype(np.uint8)
    lengths = entropy.huffman_lengths(np.bincount(symbols, minlength=8))
    for chunk in (1, 7, 4096):
        stream, chunks = entropy.huffman_encode(symbols, lengths, chunk)
        decoded = entropy.huffman_decode(stream, chunks, lengths, symbols.size, chunk)
        assert np.array_equal(decoded, symbols), chunk


def test_ans_min_bits_bounds_what_each_symbol_costs():
    """The loader's bound on symbols per rANS word rests on this: however a stream is made,
    each symbol decoded from it (while it lasts) takes at least ``ans_min_bits`` bits."""
    for counts in ([1, 1000], [5, 3, 1000, 2], [1] * 255 + [10**6], [3, 1, 4, 1, 5, 9, 2, 6]):
        counts = np.array(counts)
        most = int(np.argmax(counts))  # not the first symbol, which can be free at the end
        n = 200_000
        words = entropy.ans_encode(np.full(n, most, dtype=np.uint8), counts)
        assert 32 * words.size + 64 >= n * entropy.ans_min_bits(counts), counts


def test_ans_decode_refuses_a_claim_beyond_its_stream_before_allocating():
    counts = np.array([10**6, 1, 1, 1])
    words = np.ones(16_000, dtype=np.uint32)
    limit = entropy.ans_max_symbols(counts, words.size)
    assert limit <= entropy.ANS_FREE_SYMBOLS + entropy.ANS_MAX_SYMBOLS_PER_BIT * 32 * words.size
    with pytest.raises(entropy.CodingError, match="symbols claimed"):
        entropy.ans_decode(words, counts, 256 * 32 * words.size)  # 500 MB of int32 before


def test_rans_gives_way_to_huffman_where_a_stream_would_claim_too_much(tmp_path):
    """rANS codes a run of its first symbol at the end of a stream almost for free (an
    all-zero tensor, sorted last): more weights per stored bit than the loader believes.
    The writer then uses Huffman, so that every file it writes loads."""
    spec = QuantSpec("uniform", 4, 256)
    torch.manual_seed(0)
    state = {"a": spec.quantize(torch.randn(64, 64)), "z": torch.zeros(1000, 1000)}
    save_packed(state, tmp_path / "w.qd", specs={"a": spec, "z": spec}, entropy="ans")
    (coder,) = packed_summary(tmp_path / "w.qd")[1]
    assert coder.kind == "huffman"
    loaded, _ = load_packed(tmp_path / "w.qd")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    save_packed({"a": state["a"]}, tmp_path / "a.qd", specs={"a": spec}, entropy="ans")
    assert packed_summary(tmp_path / "a.qd")[1][0].kind == "ans"  # ordinary weights keep rANS


def test_a_huffman_stream_stuck_on_an_invalid_code_stops_at_once():
    lengths = np.array([1, 2, 0, 0])  # codes 0 and 10: a window of 11... decodes nothing
    stream = np.full(2, 0xFF, dtype=np.uint8)
    with pytest.raises(entropy.CodingError, match="invalid Huffman code"):
        entropy.huffman_decode(stream, np.array([16], dtype=np.uint32), lengths, 8, chunk=1 << 16)
