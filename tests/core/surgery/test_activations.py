"""Learned-step-size quantization (LSQ) of activations and weights, as QKD uses it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compressor
from compressor import save_packed
from compressor.format.packed import load_packed
from compressor.quantization.grids import _round_significand
from compressor.quantization.lsq import lsq_quantize
from compressor.surgery.activations import activation_quantizers, insert_activation_quantizers
from compressor.surgery.quantizers import LsqActivationQuantizer


def _reference_grads(x, step, qn, qp, g, upstream):
    """LSQ's gradients (Esser et al. 2020, eq. 3 and 5) written out."""
    s = _round_significand(step.detach().abs(), 16)
    v = x.detach() / s
    inside = (v >= qn) & (v <= qp)
    d_step = torch.where(v < qn, float(qn), torch.where(v > qp, float(qp), v.round() - v))
    return upstream * inside, (upstream * d_step).sum() * g


@pytest.mark.parametrize(("qn", "qp"), [(0, 7), (-8, 7), (-2, 1)])
def test_lsq_gradients_match_the_papers(qn, qp):
    gen = torch.Generator().manual_seed(qp)
    x = (torch.randn(200, generator=gen) * 3).requires_grad_(True)
    step = torch.tensor(0.37, requires_grad=True)
    upstream = torch.randn(200, generator=gen)
    g = 1 / math.sqrt(x.numel() * qp)
    q = lsq_quantize(x, step, qn, qp, g)
    (q * upstream).sum().backward()
    want_x, want_step = _reference_grads(x, step, qn, qp, g, upstream)
    torch.testing.assert_close(x.grad, want_x)
    assert step.grad.item() == pytest.approx(want_step.item(), rel=1e-5, abs=1e-7)
    # Forward: integers times the step (16 significant bits), clipped to [qn, qp].
    s = _round_significand(step.detach(), 16)
    k = q.detach() / s
    assert torch.equal(k, k.round()) and k.min() >= qn and k.max() <= qp


def test_lsq_step_gradient_of_clipped_values_is_the_true_derivative():
    """Where every value clips, q = qp * s exactly: finite differences agree (times g)."""
    x = torch.full((50,), 100.0)
    step = torch.tensor(0.5, requires_grad=True)
    lsq_quantize(x, step, -4, 3, 1.0).sum().backward()
    eps = 2.0**-10
    fd = (
        lsq_quantize(x, torch.tensor(0.5 + eps), -4, 3, 1.0).sum()
        - lsq_quantize(x, torch.tensor(0.5 - eps), -4, 3, 1.0).sum()
    ) / (2 * eps)
    assert step.grad.item() == pytest.approx(fd.item(), rel=1e-6)


def test_activation_quantizer_initialises_from_the_first_batch():
    gen = torch.Generator().manual_seed(0)
    relu_out = torch.relu(torch.randn(64, 10, generator=gen))
    unsigned = LsqActivationQuantizer(4)
    out = unsigned(relu_out)
    assert not bool(unsigned.signed)
    assert unsigned.step.item() == pytest.approx(2 * relu_out.abs().mean().item() / math.sqrt(15))
    assert out.min() >= 0
    k = out / _round_significand(unsigned.step.detach(), 16)
    assert torch.equal(k, k.round()) and k.max() <= 15

    signed = LsqActivationQuantizer(4)
    raw = torch.randn(64, 10, generator=gen)
    out = signed(raw)
    assert bool(signed.signed)
    assert signed.step.item() == pytest.approx(2 * raw.abs().mean().item() / math.sqrt(7))
    k = out / _round_significand(signed.step.detach(), 16)
    assert k.min() >= -8 and k.max() <= 7 and k.min() < 0
    # Later batches do not re-initialise.
    before = signed.step.item()
    signed(raw * 10)
    assert signed.step.item() == before


def test_activation_step_gradient_in_a_layer():
    layer = nn.Linear(10, 3)
    insert_activation_quantizers([("fc", layer)], 3)
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(1))
    layer(x)  # initialise
    quantizer = layer.input_quantizer
    upstream = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    (layer(x) * upstream).sum().backward()
    # The step's gradient through the layer: chain rule by hand.
    grad_input = upstream @ layer.weight.detach()
    _, want = _reference_grads(x, quantizer.step, -4, 3, 1 / math.sqrt(x.numel() * 3), grad_input)
    assert quantizer.step.grad.item() == pytest.approx(want.item(), rel=1e-4)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def test_quantize_with_act_bits_quantizes_layer_inputs(tmp_path):
    model = compressor.quantize_(_cnn(), compressor.QuantConfig(bits=4, method="lsq", act_bits=3))
    assert len(activation_quantizers(model)) == 3
    seen = {}

    def capture(name):
        def hook(module, args):
            seen[name] = args[0].detach()

        return hook

    for name in ("0", "2", "5"):
        model.get_submodule(name).register_forward_pre_hook(capture(name))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model(x)
    for name, signed in (("0", True), ("2", False), ("5", False)):
        quantizer = model.get_submodule(name).input_quantizer
        assert bool(quantizer.signed) is signed
        k = seen[name] / _round_significand(quantizer.step.detach(), 16)
        assert torch.equal(k, k.round())
        assert k.min() >= (-4 if signed else 0) and k.max() <= (3 if signed else 7)

    # LSQ weights: integers times a learned step, which receives gradient; packing is exact.
    model(x).sum().backward()
    for _, module, tensor_name, quantizer in compressor.quantized_tensors(model):
        assert quantizer.step.grad is not None and quantizer.step.grad.item() != 0
        k = getattr(module, tensor_name).detach() / _round_significand(quantizer.step.detach(), 16)
        assert torch.equal(k, k.round()) and k.min() >= -8 and k.max() <= 7
    expected = compressor.quantized_state_dict(model)
    save_packed(model, tmp_path / "lsq.qd")
    loaded, _ = load_packed(tmp_path / "lsq.qd")
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    with torch.no_grad():
        before = model(x)
    compressor.materialize_(model)  # activation quantizers stay: the model still runs W4A3
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_embeddings_and_recurrent_layers_keep_full_precision_inputs():
    emb, lstm, fc = nn.Embedding(10, 4), nn.LSTM(4, 4), nn.Linear(4, 2)
    done = insert_activation_quantizers([("emb", emb), ("lstm", lstm), ("fc", fc)], 4)
    assert done == ["fc"]
    assert not hasattr(emb, "input_quantizer") and not hasattr(lstm, "input_quantizer")


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_act_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match="act_bits must be from 1 to 8"):
        compressor.QuantConfig(act_bits=bits)
    with pytest.raises(ValueError, match="act_bits must be from 1 to 8"):
        insert_activation_quantizers([("fc", nn.Linear(2, 2))], bits)
    with pytest.raises(ValueError, match="act_bits must be from 1 to 8"):
        LsqActivationQuantizer(bits)


def test_lsq_weights_need_two_bits():
    with pytest.raises(ValueError, match="method='lsq' must be from 2 to 8"):
        compressor.quantize_(_cnn(), compressor.QuantConfig(bits=1, method="lsq"))
