"""Packed files keep a state dict's ``_metadata`` (module versions, which some modules'
``load_state_dict`` reads), and a damaged or hostile copy of it raises PackedFormatError."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

import compressor
from compressor.format.packed import PackedFormatError, _checksum


class Versioned(nn.Module):
    """Like torchvision's MNASNet: refuses a state dict without its version."""

    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 3:
            raise ValueError(f"version should be 3, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def _versions(model: nn.Module) -> dict:
    return {k: dict(v) for k, v in model.state_dict()._metadata.items()}


@pytest.mark.parametrize("materialize", [False, True])
def test_a_packed_model_keeps_its_module_versions(tmp_path, materialize):
    torch.manual_seed(0)
    model = Versioned().eval()
    plain = _versions(model)
    compressor.quantize_(model, compressor.QuantConfig(bits=4))
    if materialize:
        compressor.materialize_(model)
    compressor.save_packed(model, tmp_path / "m.qd")
    state, _ = compressor.load_packed(tmp_path / "m.qd")
    assert isinstance(state, OrderedDict)
    assert state._metadata == plain  # no entries of the quantizers' own modules
    Versioned().load_state_dict(state)
    # The plain state dicts of a quantized model keep them too.
    Versioned().load_state_dict(compressor.quantized_state_dict(model))


def test_a_state_dict_with_specs_keeps_its_module_versions(tmp_path):
    model = Versioned()
    state, record = compressor.quantize_state_dict(
        model.state_dict(), compressor.QuantConfig(bits=4)
    )
    assert state._metadata == model.state_dict()._metadata
    compressor.save_packed(state, tmp_path / "s.qd", specs=record.specs)
    loaded, _ = compressor.load_packed(tmp_path / "s.qd")
    Versioned().load_state_dict(loaded)


def test_a_plain_dict_packs_without_module_versions(tmp_path):
    compressor.write_packed({"w": torch.ones(3)}, tmp_path / "p.qd")
    state, _ = compressor.load_packed(tmp_path / "p.qd")
    assert isinstance(state, OrderedDict) and not hasattr(state, "_metadata")


def test_module_versions_that_json_cannot_hold_are_refused(tmp_path):
    state = OrderedDict(w=torch.ones(3))
    state._metadata = {"": {"version": object()}}
    with pytest.raises(ValueError, match="module versions"):
        compressor.write_packed(state, tmp_path / "x.qd")


HOSTILE = [
    "not json",
    "{}",
    "7",
    "[1]",
    "[[1, 2, 3]]",
    '[[{"version": 1}, "fc"]]',
    '[[{"version": 1}, [1]]]',
    '[[{"version": [1]}, ["fc"]]]',
    '[[{"version": {"a": 1}}, ["fc"]]]',
    '[[[], ["fc"]]]',
    '[[{"version": ' + "9" * 5000 + '}, ["fc"]]]',
    "[" * 100_000 + "]" * 100_000,
]


@pytest.mark.parametrize("field", HOSTILE, ids=range(len(HOSTILE)))
def test_damaged_module_versions_raise_packed_format_error(tmp_path, field):
    path = tmp_path / "m.qd"
    compressor.save_packed(Versioned().state_dict(), path)
    data = path.read_bytes()
    payload = st_load(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert "module_versions" in header
    header["module_versions"] = field
    header["checksum"] = _checksum(header, payload)  # re-signed, as an attacker would
    path.write_bytes(st_save(payload, metadata=header))
    with pytest.raises(PackedFormatError, match="module versions"):
        compressor.load_packed(path)
