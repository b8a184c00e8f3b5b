"""Tensors left out of a packed file because loading rebuilds them (issue 18, item 4): the
file keeps their name, shape, dtype and why, loading gives ``meta`` placeholders, ``qdistill
inspect`` lists them and ``qdistill unpack`` has the checkpoint's format plugin fill them."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from compressor.cli.packed import pack_checkpoint
from compressor.format.packed import (
    PackedFormatError,
    _checksum,
    load_packed,
    packed_info,
    write_packed,
)
from compressor.quantization.record import QuantSpec

WHY = "a sinusoid of the position: the model's constructor makes it"


def _table() -> torch.Tensor:
    position = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    return torch.sin(position / 10 ** (torch.arange(8) / 8)).unsqueeze(1)  # [100, 1, 8]


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc.weight": torch.randn(4, 8), "fc.bias": torch.randn(4), "pe": _table()}


def _header(path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def test_a_rebuilt_tensor_is_described_not_stored(tmp_path):
    state = _state()
    full = write_packed(state, tmp_path / "full.qd")
    size = write_packed(state, tmp_path / "m.qd", rebuilt={"pe": WHY})
    assert full - size > 0.9 * state["pe"].numel() * 4  # the header grows by the reason
    assert _header(tmp_path / "m.qd")["version"] == "4"
    assert _header(tmp_path / "full.qd")["version"] == "2"  # older readers still take it
    assert "pe" not in st_load((tmp_path / "m.qd").read_bytes())

    loaded, _ = load_packed(tmp_path / "m.qd")
    assert sorted(loaded) == sorted(state)
    assert loaded["pe"].is_meta and loaded["pe"].shape == (100, 1, 8)
    assert loaded["pe"].dtype == torch.float32
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])
    row = {r.name: r for r in packed_info(tmp_path / "m.qd")}["pe"]
    assert (row.coding, row.stored_bytes, row.rebuilt) == ("rebuilt", 0, WHY)
    assert row.shape == (100, 1, 8)


def test_a_loaded_state_packs_again_with_its_placeholders(tmp_path):
    write_packed(_state(), tmp_path / "m.qd", rebuilt={"pe": WHY})
    loaded, _ = load_packed(tmp_path / "m.qd")
    write_packed(loaded, tmp_path / "again.qd", rebuilt={"pe": WHY})
    assert load_packed(tmp_path / "again.qd")[0]["pe"].is_meta
    with pytest.raises(ValueError, match="placeholder without data"):
        write_packed(loaded, tmp_path / "x.qd")


@pytest.mark.parametrize(
    ("rebuilt", "message"),
    [
        ({"missing": WHY}, "not in the state dict"),
        ({"fc.weight": WHY}, "not both"),
        ({"pe": " "}, "say why"),
        ({"pe": None}, "say why"),
    ],
)
def test_what_cannot_be_left_out_is_refused(tmp_path, rebuilt, message):
    specs = {"fc.weight": QuantSpec("uniform", 4, 32)}
    state = _state()
    state["fc.weight"] = specs["fc.weight"].quantize(state["fc.weight"])
    with pytest.raises(ValueError, match=message):
        write_packed(state, tmp_path / "m.qd", specs=specs, rebuilt=rebuilt)
    assert not (tmp_path / "m.qd").exists()


def _resigned(path, edit) -> None:
    """The file with its metadata edited and the checksum recomputed, as an attacker would."""
    data = path.read_bytes()
    payload, header = st_load(data), _header(path)
    edit(header)
    header["checksum"] = _checksum(header, payload)
    path.write_bytes(st_save(payload, metadata=header))


def _edit_entry(name: str, **fields):
    def edit(header: dict) -> None:
        entries = json.loads(header["tensors"])
        entries[name] = fields
        header["tensors"] = json.dumps(entries)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(version="3"), "version-3 file"),
        (_edit_entry("fc.bias", tied="pe"), "itself rebuilt"),
        (_edit_entry("pe", rebuilt=WHY, shape=[2**40, 2**40], dtype="float32"), "rebuilt tensor"),
        (_edit_entry("pe", rebuilt=WHY, shape=[3], dtype="int64"), "dtype must be one of"),
        (_edit_entry("pe", rebuilt=7, shape=[3], dtype="float32"), "must be a string"),
        (_edit_entry("pe", rebuilt=WHY, shape=[3], dtype="float32", x=1), "unexpected field"),
    ],
)
def test_damaged_rebuilt_entries_raise_packed_format_error(tmp_path, edit, message):
    write_packed(_state(), tmp_path / "m.qd", rebuilt={"pe": WHY})
    _resigned(tmp_path / "m.qd", edit)
    with pytest.raises(PackedFormatError, match=message):
        load_packed(tmp_path / "m.qd")


def _main(args, folder, monkeypatch, capsys):
    from compressor.cli import main

    monkeypatch.chdir(folder)
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_inspect_says_what_was_left_out_and_unpack_has_the_plugin_rebuild_it(
    tmp_path, monkeypatch, capsys
):
    import compressor.cli.packed as packed_cli

    def rebuild(state, metadata):
        return {k: _table() if v.is_meta else v for k, v in state.items()}

    plugin = types.SimpleNamespace(
        rebuild=rebuild, to_checkpoint=lambda state, metadata: {"model": dict(state)}
    )
    monkeypatch.setattr(packed_cli, "checkpoint_formats", lambda: {"fake": plugin})
    state = _state()
    metadata = {"checkpoint_format": "fake"}
    pack_checkpoint(state, tmp_path / "m.qd", metadata=metadata, rebuilt={"pe": WHY})

    code, out, _ = _main(["inspect", "m.qd"], tmp_path, monkeypatch, capsys)
    assert code == 0
    left_out = math.prod(state["pe"].shape) * 4
    assert f"left out of the file, rebuilt at load: 1 tensors, {left_out:,} bytes" in out
    assert f"  pe [100, 1, 8] float32: {WHY}" in out

    for output in ("u.pt", "u.safetensors"):
        assert _main(["unpack", "m.qd", "-o", output], tmp_path, monkeypatch, capsys)[0] == 0
    assert torch.equal(torch.load(tmp_path / "u.pt", weights_only=True)["model"]["pe"], _table())

    monkeypatch.setattr(packed_cli, "checkpoint_formats", lambda: {})
    code, _, err = _main(["unpack", "m.qd", "-o", "v.pt"], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "which is not installed here" in err[0], err
    assert not (tmp_path / "v.pt").exists()
