"""The int4 runtime (issue 16): a model trained on the kernel grid runs on PyTorch's int4
kernel with exactly the trained weights; outputs differ from fp32 only by bf16 activations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import compressor
from compressor.format.packed import load_packed_codes
from compressor.runtime.int4 import CodedEmbedding, Int4Linear, Int4LSTM, Int4LSTMCell

pytestmark = pytest.mark.skipif(
    not compressor.int4_kernel_available("cpu"), reason="this PyTorch has no CPU int4 kernel"
)
KERNEL = compressor.QuantConfig(bits=4, bucket_size=32, grid="int4_kernel")


class Tiny(nn.Module):
    """Every supported layer type, in OpenNMT's RNN shapes (sizes in groups of 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=1)
        self.encoder = nn.LSTM(32, 32, num_layers=2, bidirectional=True)
        self.cell = nn.LSTMCell(32 + 64, 64)  # [embedding; input feed]
        self.generator = nn.Linear(64, 50)  # 50 outputs: padded to the packing op's 16s
        self.odd = nn.Linear(48, 16)  # K = 48 is not in groups of 32: the min-max grid


def trained_student(seed: int = 0) -> Tiny:
    """Quantized on the kernel grid, one straight-through step, then materialized."""
    torch.manual_seed(seed)
    model = Tiny()
    compressor.quantize_(model, KERNEL)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with compressor.quantize_once():
        out, _ = model.encoder(model.emb(torch.randint(0, 50, (5, 3))))
        h, _ = model.cell(torch.cat([out[-1], out[-1][:, :32].repeat(1, 2)], 1)[:, :96])
        loss = model.generator(h).logsumexp(1).mean() + model.odd(torch.randn(2, 48)).sum()
    loss.backward()
    opt.step()
    return compressor.materialize_(model)


def test_specs_say_which_tensors_are_on_the_kernel_grid():
    specs = compressor.quantization_specs(trained_student())
    assert specs["odd.weight"].method == "uniform"  # the fallback: K not in groups
    assert {s.method for n, s in specs.items() if n != "odd.weight"} == {"int4_kernel"}
    runs = {r.name: r.runs_on for r in compressor.size_report(trained_student()).rows}
    assert runs["generator.weight"] == "int4 kernel" and runs["cell.weight_hh"] == "int4 kernel"
    assert runs["emb.weight"] == "codes lookup" and runs["odd.weight"] == "fp32"
    assert runs["generator.bias"] == "fp32"


def test_kernel_weights_equal_materialized_values_bit_for_bit(tmp_path):
    model = trained_student()
    fp32 = copy.deepcopy(model)
    path = tmp_path / "student.qd"
    compressor.save_packed(model, path)
    state, _ = compressor.load_packed(path)
    assert all(torch.equal(state[k], v) for k, v in fp32.state_dict().items())
    report = compressor.to_int4_runtime_(model, path)
    assert report.path == "int4"
    assert set(report.on_kernel) == {"encoder", "cell", "generator"}
    assert [(e.name, e.path) for e in report.entries if e.path != "int4 kernel"] == [
        ("emb", "codes lookup"),
        ("odd", "dense"),
    ]
    assert isinstance(model.generator, Int4Linear) and isinstance(model.cell, Int4LSTMCell)
    assert isinstance(model.encoder, Int4LSTM) and isinstance(model.emb, CodedEmbedding)
    assert type(model.odd) is nn.Linear
    # Linear: the weight the kernel multiplies with is the materialized one, bit for bit.
    assert torch.equal(model.generator.weight_int4.dequantize(), fp32.generator.weight)
    # LSTMCell: [W_ih | W_hh] in one kernel matrix.
    w_ih, w_hh = model.cell.dequantized_weights()
    assert torch.equal(w_ih, fp32.cell.weight_ih) and torch.equal(w_hh, fp32.cell.weight_hh)
    # LSTM: every layer and direction, input and hidden weights.
    names = [f"_l{layer}{d}" for layer in range(2) for d in ("", "_reverse")]
    for i, suffix in enumerate(names):
        w_ih, w_hh = model.encoder.dequantized_weights(i)
        assert torch.equal(w_ih, getattr(fp32.encoder, f"weight_ih{suffix}"))
        assert torch.equal(w_hh, getattr(fp32.encoder, f"weight_hh{suffix}"))
    # Embedding: rows looked up from the codes decode to the table bit for bit.
    assert torch.equal(model.emb(torch.arange(50)), fp32.emb.weight)
    # Resident memory: codes and bf16 pairs instead of fp32 weights.
    assert compressor.resident_bytes(model) < compressor.resident_bytes(fp32) / 4


def _close(a: torch.Tensor, b: torch.Tensor, bound: float) -> None:
    """The difference bf16 activations make: a few bf16 ulps of the output's magnitude."""
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = b.abs().max().clamp_min(1e-3)
    assert float((a - b).abs().max() / scale) < bound


def test_outputs_differ_only_by_bf16_activations():
    model = trained_student()
    fp32 = copy.deepcopy(model).eval()
    compressor.to_int4_runtime_(model)  # the codes from the model's own record
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (7, 4), generator=gen)
    lengths = torch.tensor([7, 2, 5, 4])
    with torch.no_grad():
        emb_a, emb_b = model.emb(tokens), fp32.emb(tokens)
        assert torch.equal(emb_a, emb_b)
        packed_a, (h_a, c_a) = model.encoder(
            pack_padded_sequence(emb_a, lengths, enforce_sorted=False)
        )
        packed_b, (h_b, c_b) = fp32.encoder(
            pack_padded_sequence(emb_b, lengths, enforce_sorted=False)
        )
        assert torch.equal(packed_a.batch_sizes, packed_b.batch_sizes)
        assert torch.equal(packed_a.sorted_indices, packed_b.sorted_indices)
        for a, b in ((packed_a.data, packed_b.data), (h_a, h_b), (c_a, c_b)):
            _close(a, b, 2e-2)
        out_a, _ = model.encoder(emb_a.transpose(0, 1).contiguous().transpose(0, 1))
        out_b, _ = fp32.encoder(emb_b)
        _close(out_a, out_b, 2e-2)
        x = torch.randn(4, 96, generator=gen)
        state = (torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen))
        for a, b in zip(model.cell(x, state), fp32.cell(x, state)):
            _close(a, b, 2e-2)
        hidden = torch.randn(3, 5, 64, generator=gen)
        _close(model.generator(hidden), fp32.generator(hidden), 2e-2)
        assert torch.equal(model.odd(x[:, :48]), fp32.odd(x[:, :48]))  # untouched


def test_batch_first_and_unbatched_lstm():
    torch.manual_seed(4)
    lstm = nn.LSTM(32, 32, batch_first=True)
    compressor.quantize_(lstm_holder := nn.Sequential(lstm), KERNEL)
    compressor.materialize_(lstm_holder)
    fp32 = copy.deepcopy(lstm_holder)
    compressor.to_int4_runtime_(lstm_holder)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        a, (h, c) = lstm_holder[0](x)
        b, (h2, c2) = fp32[0](x)
        _close(a, b, 2e-2)
        assert h.shape == h2.shape == (1, 2, 32)
        a1, _ = lstm_holder[0](x[0])
        _close(a1, b[0], 2e-2)


def test_the_model_must_hold_the_weights_its_codes_decode_to(tmp_path):
    path = tmp_path / "a.qd"
    compressor.save_packed(trained_student(0), path)
    other = trained_student(1)
    with pytest.raises(ValueError, match="not what these codes decode to"):
        compressor.to_int4_runtime_(other, path)


def test_a_model_off_the_kernel_grid_is_refused_and_left_alone():
    torch.manual_seed(0)
    model = Tiny()
    compressor.quantize_(model, compressor.QuantConfig(bits=4, bucket_size=32))
    compressor.materialize_(model)
    with pytest.raises(ValueError, match="no weight of this model is on the int4 kernel grid"):
        compressor.to_int4_runtime_(model)
    assert type(model.generator) is nn.Linear and type(model.emb) is nn.Embedding


def test_packed_file_stores_bf16_pairs_and_says_version_3(tmp_path):
    import json

    model = trained_student()
    kernel_file, plain_file = tmp_path / "k.qd", tmp_path / "m.qd"
    compressor.save_packed(model, kernel_file)
    header = json.loads(
        kernel_file.read_bytes()[8 : 8 + int.from_bytes(kernel_file.read_bytes()[:8], "little")]
    )
    assert header["__metadata__"]["version"] == "3"
    assert header["generator.weight::scale"]["dtype"] == "I16"
    assert header["odd.weight::scale"]["dtype"] == "F32"
    minmax = Tiny()
    compressor.quantize_(minmax, compressor.QuantConfig(bits=4, bucket_size=32))
    compressor.save_packed(minmax, plain_file)  # no kernel grid: still version 2
    plain = json.loads(
        plain_file.read_bytes()[8 : 8 + int.from_bytes(plain_file.read_bytes()[:8], "little")]
    )
    assert plain["__metadata__"]["version"] == "2"
    codes = load_packed_codes(kernel_file)
    assert codes["generator.weight"].spec.method == "int4_kernel"
    info = {i.name: i for i in compressor.packed_info(kernel_file)}
    # 4 bits a weight plus two bf16 per bucket of 32.
    assert info["generator.weight"].stored_bytes == 50 * 64 // 2 + 4 * (50 * 64 // 32)
    # With entropy coding too.
    compressor.save_packed(model, tmp_path / "h.qd", entropy="huffman")
    state, _ = compressor.load_packed(tmp_path / "h.qd")
    assert torch.equal(state["generator.weight"], model.generator.weight)


def test_record_keeps_kernel_codes_through_to_dict_and_post_training(tmp_path):
    model = trained_student()
    record = compressor.quantization_record(model)
    assert "generator.weight" in record.codes  # the bf16 pair is not in the values
    again = compressor.QuantRecord.from_dict(record.to_dict())
    assert again.specs == record.specs
    state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    quantized, ptq = compressor.quantize_state_dict(state, KERNEL, model=Tiny())
    assert ptq.specs["generator.weight"].method == "int4_kernel" and "generator.weight" in ptq.codes
    compressor.write_packed(quantized, tmp_path / "ptq.qd", specs=ptq.specs, codes=ptq.codes)
    loaded, _ = compressor.load_packed(tmp_path / "ptq.qd")
    assert torch.equal(loaded["generator.weight"], quantized["generator.weight"])
    assert torch.equal(loaded["odd.weight"], quantized["odd.weight"])
