"""quantize_ / materialize_ on every supported layer type, and QuantConfig validation."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor import QuantConfig

BITS, BUCKET = 3, 64


def _seq_input(batch=3, steps=5, features=8):
    return torch.randn(batch, steps, features)


# (module factory, input factory, names of the weights that must be quantized)
LAYERS = {
    "linear": (lambda: nn.Linear(20, 30), lambda: torch.randn(4, 20), ["weight"]),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), lambda: torch.randn(2, 4, 11), ["weight"]),
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, groups=1), lambda: torch.randn(2, 3, 9, 9), ["weight"]),
    "conv2d_depthwise": (
        lambda: nn.Conv2d(8, 8, 3, groups=8),
        lambda: torch.randn(2, 8, 7, 7),
        ["weight"],
    ),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3), lambda: torch.randn(1, 2, 5, 5, 5), ["weight"]),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(4, 3, 3),
        lambda: torch.randn(2, 4, 5, 5),
        ["weight"],
    ),
    "embedding": (lambda: nn.Embedding(40, 12), lambda: torch.randint(0, 40, (3, 7)), ["weight"]),
    "lstm": (
        lambda: nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True),
        _seq_input,
        [f"weight_{k}_l{i}{d}" for i in (0, 1) for d in ("", "_reverse") for k in ("ih", "hh")],
    ),
    "lstm_proj": (
        lambda: nn.LSTM(8, 16, proj_size=6, batch_first=True),
        _seq_input,
        ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"],
    ),
    "gru": (
        lambda: nn.GRU(8, 10, num_layers=2, batch_first=True),
        _seq_input,
        ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"],
    ),
    "rnn": (lambda: nn.RNN(8, 10, batch_first=True), _seq_input, ["weight_ih_l0", "weight_hh_l0"]),
    "lstm_cell": (
        lambda: nn.LSTMCell(8, 12),
        lambda: (torch.randn(3, 8), (torch.randn(3, 12), torch.randn(3, 12))),
        ["weight_ih", "weight_hh"],
    ),
    "gru_cell": (
        lambda: nn.GRUCell(8, 12),
        lambda: (torch.randn(3, 8), torch.randn(3, 12)),
        ["weight_ih", "weight_hh"],
    ),
}


def _output(module, x):
    out = module(*x) if isinstance(x, tuple) else module(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("method", ["uniform", "nonuniform"])
def test_parametrized_forward_equals_manual_quantization(kind, method):
    torch.manual_seed(0)
    make, make_input, weights = LAYERS[kind]
    module = make()
    reference = copy.deepcopy(module)
    compressor.quantize_(module, QuantConfig(bits=BITS, bucket_size=BUCKET, method=method))
    quantized = {name for name, *_ in compressor.quantized_tensors(module)}
    assert quantized == set(weights)
    specs = compressor.quantization_specs(module)
    with torch.no_grad():
        for name in weights:
            getattr(reference, name).copy_(specs[name].quantize(getattr(reference, name)))
    x = make_input()
    with compressor.quantize_once():
        assert torch.equal(_output(module, x), _output(reference, x))

    # A few optimiser steps move the full-precision shadow weights, and reads stay on the grid.
    shadows = {n: p.detach().clone() for n, p in module.named_parameters() if "original" in n}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        with compressor.quantize_once():
            _output(module, x).float().pow(2).mean().backward()
        optimizer.step()
    for name, before in shadows.items():
        after = dict(module.named_parameters())[name]
        assert after.dtype == torch.float32
        assert not torch.equal(after, before), name
    specs = compressor.quantization_specs(module)
    for name in weights:
        value = getattr(module, name)
        assert torch.equal(value, specs[name].quantize(value))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(30, 16)
        self.hidden = nn.Linear(16, 16)
        self.generator = nn.Linear(16, 30)
        self.generator.weight = self.embedding.weight

    def forward(self, tokens):
        return self.generator(torch.tanh(self.hidden(self.embedding(tokens))))


@pytest.mark.parametrize("method", ["uniform", "nonuniform"])
def test_tied_weights_stay_tied(method):
    torch.manual_seed(0)
    model = Tied()
    compressor.quantize_(model, QuantConfig(bits=4, bucket_size=32, method=method))
    shadows = [n for n, _ in model.named_parameters() if n.endswith("original")]
    assert len(shadows) == 2  # one shared by embedding and generator, one for hidden
    tokens = torch.randint(0, 30, (4, 6))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
    assert torch.equal(model.embedding.weight, model.generator.weight)
    expected = model(tokens)
    compressor.materialize_(model)
    assert model.embedding.weight is model.generator.weight
    assert torch.equal(model(tokens), expected)


def test_materialize_keeps_exact_values_and_specs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    compressor.quantize_(model, QuantConfig(bits=2, bucket_size=16))
    x = torch.randn(8, 10)
    expected = model(x)
    plain = compressor.quantized_state_dict(model)
    assert set(plain) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    compressor.materialize_(model)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    assert torch.equal(model(x), expected)
    assert set(compressor.quantization_specs(model)) == {"0.weight", "2.weight"}
    fresh = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    fresh.load_state_dict(plain)
    assert torch.equal(fresh(x), expected)


def test_shadow_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    original = copy.deepcopy(model.state_dict())
    compressor.quantize_(model, QuantConfig(bits=4))
    shadow = compressor.shadow_state_dict(model)
    assert all(torch.equal(shadow[k], v) for k, v in original.items())
    other = compressor.quantize_(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)), QuantConfig())
    compressor.load_shadow_state_dict(other, shadow)
    x = torch.randn(3, 6)
    assert torch.equal(other(x), model(x))


def test_selection_include_exclude_first_last_and_overrides():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(1, 3, 9, 9))
    config = QuantConfig(bits=4, keep_first_last=True, bits_overrides={r"^2$": 2})
    compressor.quantize_(model, config)
    specs = compressor.quantization_specs(model)
    assert set(specs) == {"1.weight", "2.weight"}
    assert specs["1.weight"].bits == 4 and specs["2.weight"].bits == 2

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    compressor.quantize_(model, QuantConfig(include=(r"^[01]$",), exclude=(r"^0$",)))
    assert set(compressor.quantization_specs(model)) == {"1.weight"}


def test_norm_layers_and_biases_stay_full_precision():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm([4, 5, 5]))
    compressor.quantize_(model, QuantConfig(bits=2))
    assert set(compressor.quantization_specs(model)) == {"0.weight"}


def test_quantizing_twice_is_refused():
    model = nn.Linear(3, 3)
    compressor.quantize_(model, QuantConfig())
    with pytest.raises(ValueError, match="already quantized"):
        compressor.quantize_(model, QuantConfig())


def test_stochastic_rounding_in_training_nearest_in_eval():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    compressor.quantize_(layer, QuantConfig(bits=2, rounding="stochastic"))
    assert not torch.equal(layer.weight, layer.weight)  # a fresh draw on every read
    layer.eval()
    assert torch.equal(layer.weight, layer.weight)
    assert torch.equal(layer.weight, compressor.quantize_tensor(layer.weight, 2, 256))


def test_size_report_counts_bits_and_buckets():
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 10))
    compressor.quantize_(model, QuantConfig(bits=4, bucket_size=256))
    report = compressor.size_report(model)
    first = next(r for r in report.rows if r.name == "0.weight")
    assert first.buckets == 64 and first.bytes == 256 * 64 / 2 + 64 * 8
    assert report.fp32_bytes == 4 * sum(
        p.numel() for p in compressor.shadow_state_dict(model).values()
    )
    assert 6 < report.compression < 8
    assert "compression" in str(report)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 0}, "bits must be from 1 to 8"),
        ({"bits": 9}, "bits must be from 1 to 8"),
        ({"bucket_size": 0}, "bucket_size must be a positive integer"),
        ({"bucket_size": -5}, "bucket_size must be a positive integer"),
        ({"method": "kmeans"}, "method must be one of .*uniform.*nonuniform.*differentiable"),
        ({"rounding": "up"}, "rounding must be one of .*nearest.*stochastic"),
        ({"act_bits": 12}, "act_bits must be from 1 to 8"),
        ({"point_init": "random"}, "point_init must be one of"),
        ({"include": ("[",)}, "include"),
        ({"bits_overrides": {"fc": 0}}, r"bits_overrides\['fc'\]"),
        ({"method": "nonuniform", "rounding": "stochastic"}, "stochastic.*uniform"),
    ],
)
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_include_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="include: regex 'decoder' matches no quantizable module"):
        compressor.quantize_(nn.Sequential(nn.Linear(2, 2)), QuantConfig(include=("decoder",)))


def test_config_is_frozen_and_hashable():
    config = QuantConfig(bits_overrides={"a": 2})
    with pytest.raises(AttributeError):
        config.bits = 3  # type: ignore[misc]
    assert hash(config) == hash(QuantConfig(bits_overrides={"a": 2}))


def test_cli_help_and_version():
    exe = Path(sys.executable).with_name("qdistill")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"qdistill {compressor.__version__}"
    usage = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "usage: qdistill" in usage.stdout
