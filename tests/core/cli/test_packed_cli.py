"""``qdistill inspect / pack / unpack`` as users run them, and ``pack_checkpoint`` from Python."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import compressor
from compressor.cli.packed import pack_checkpoint
from compressor.format.packed import load_packed, packed_info
from compressor.quantization.record import QuantRecord, QuantSpec


def _qdistill(*args, cwd):
    exe = Path(sys.executable).with_name("qdistill")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_pack_inspect_unpack_a_torchvision_style_checkpoint(tmp_path, monkeypatch, capsys):
    from compressor.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10), nn.LayerNorm(10))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ck.pt")
    done = _qdistill(
        "pack",
        "ck.pt",
        "-o",
        "ck.qd",
        "--bits",
        "4",
        "--entropy",
        "huffman",
        "--exclude",
        r"^2$",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "ck.qd" in done.stdout and "smaller" in done.stdout
    monkeypatch.chdir(tmp_path)  # the installed command packed; the same main() goes on
    assert main(["inspect", "ck.qd"]) == 0
    shown = capsys.readouterr().out
    assert "0.weight" in shown and "huffman" in shown
    assert "compression" in shown and "entropy" in shown
    rows = {r.name: r for r in packed_info(tmp_path / "ck.qd")}
    assert rows["0.weight"].spec == QuantSpec("uniform", 4, 256)
    assert rows["2.weight"].spec is None and rows["3.weight"].spec is None  # excluded, 1-D
    for out in ("plain.pt", "plain.safetensors"):
        assert main(["unpack", "ck.qd", "-o", out]) == 0
    as_pt = torch.load(tmp_path / "plain.pt", weights_only=True)
    as_st = load_file(tmp_path / "plain.safetensors")
    expected = compressor.quantize_tensor(model.state_dict()["0.weight"], 4, 256)
    for state in (as_pt, as_st):
        assert torch.equal(state["0.weight"], expected)
        assert torch.equal(state["2.weight"], model.state_dict()["2.weight"])
        assert torch.equal(state["0.bias"], model.state_dict()["0.bias"])
    fresh = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10), nn.LayerNorm(10))
    fresh.load_state_dict(as_pt)


def test_pack_nonuniform_from_safetensors(tmp_path):
    torch.manual_seed(0)
    state = {"enc.weight": torch.randn(64, 48), "enc.bias": torch.randn(64)}
    save_file(state, tmp_path / "m.safetensors")
    done = _qdistill(
        "pack",
        "m.safetensors",
        "-o",
        "m.qd",
        "--method",
        "nonuniform",
        "--bits",
        "3",
        "--bucket-size",
        "128",
        "--entropy",
        "ans",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    loaded, metadata = load_packed(tmp_path / "m.qd")
    spec = {r.name: r.spec for r in packed_info(tmp_path / "m.qd")}["enc.weight"]
    assert spec.method == "nonuniform" and spec.bits == 3 and spec.bucket_size == 128
    assert torch.equal(loaded["enc.weight"], spec.quantize(state["enc.weight"]))
    assert torch.equal(loaded["enc.bias"], state["enc.bias"])
    assert metadata["source"] == "m.safetensors"


def test_pack_uses_the_settings_recorded_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5))
    config = compressor.QuantConfig(bits=2, bucket_size=32, bits_overrides={r"^1$": 5})
    compressor.quantize_(model, config)
    compressor.materialize_(model)
    specs = compressor.quantization_specs(model)
    checkpoint = {
        "model": model.state_dict(),
        "qdistill": {"specs": {k: s.to_dict() for k, s in specs.items()}},
    }
    torch.save(checkpoint, tmp_path / "q.pt")
    done = _qdistill("pack", "q.pt", "-o", "q.qd", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r.name: r.spec for r in packed_info(tmp_path / "q.qd")}
    assert rows["0.weight"] == specs["0.weight"] and rows["1.weight"].bits == 5
    loaded, _ = load_packed(tmp_path / "q.qd")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_pack_checkpoint_from_python_with_explicit_specs(tmp_path):
    """As the OpenNMT plugin calls it: model and generator weights merged, specs given."""
    torch.manual_seed(0)
    spec = QuantSpec("uniform", 4, 64)
    state = {"encoder.w": spec.quantize(torch.randn(16, 16)), "generator.0.bias": torch.zeros(4)}
    size = pack_checkpoint(
        state,
        tmp_path / "onmt.qd",
        record=QuantRecord({"encoder.w": spec}),
        metadata={"vocab": ["a", "b"]},
    )
    assert size == (tmp_path / "onmt.qd").stat().st_size
    loaded, metadata = load_packed(tmp_path / "onmt.qd")
    assert torch.equal(loaded["encoder.w"], state["encoder.w"]) and metadata["vocab"] == ["a", "b"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    state = nn.Linear(8, 8).state_dict()
    torch.save(state, folder / "ck.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    pack_checkpoint(state, folder / "ck.qd")
    (folder / "junk.pt").write_bytes(b"definitely not a checkpoint")
    (folder / "truncated.qd").write_bytes((folder / "ck.qd").read_bytes()[:-5])
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (("pack", "missing.pt", "-o", "x.qd"), "no such file: missing.pt"),
        (("pack", "ck.pt", "-o", "x.qd", "--bits", "9"), "--bits must be from 1 to 8"),
        (("pack", "ck.pt", "-o", "x.qd", "--bucket-size", "0"), "--bucket-size must be a positive"),
        (("pack", "ck.pt", "-o", "x.qd", "--include", "nothing"), "matches no quantizable module"),
        (("pack", "ck.pt", "-o", "x.qd", "--include", "(["), "not a valid regex"),
        (("pack", "junk.pt", "-o", "x.qd"), "is a text file, not a checkpoint"),
        (("pack", "list.pt", "-o", "x.qd"), "expected a state dict"),
        (("pack", "ck.pt", "-o", "ck.pt"), "is also an input"),
        (("pack", "ck.pt", "-o", "ck.qd"), "exists; pass --force"),
        (("pack", "ck.pt", "-o", "."), "is a directory"),
        (("unpack", "ck.qd", "-o", "ck.pt"), "exists; pass --force"),
        (("inspect", "ck.pt"), "not a safetensors file"),
        (("inspect", "missing.qd"), "no such file"),
        (("inspect", "truncated.qd"), "not a safetensors file"),
        (("unpack", "ck.pt", "-o", "x.pt"), "not a safetensors file"),
        (("unpack", "ck.qd", "-o", "x.bin"), "must end in .pt or .safetensors"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(cli_files, args, message, monkeypatch, capsys):
    from compressor.cli import main

    monkeypatch.chdir(cli_files)
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (cli_files / "x.qd").exists()


def test_the_installed_command_reports_errors_and_bad_options(cli_files):
    done = _qdistill("unpack", "ck.pt", "-o", "x.pt", cwd=cli_files)
    assert done.returncode == 2 and "not a safetensors file" in done.stderr
    assert "Traceback" not in done.stderr
    done = _qdistill("pack", "ck.pt", "-o", "x.qd", "--method", "magic", cwd=cli_files)
    assert done.returncode == 2 and "invalid choice" in done.stderr


@pytest.mark.parametrize("method", ["uniform", "differentiable", "lsq"])
def test_pack_reads_the_record_of_a_training_checkpoint(tmp_path, method):
    """A training checkpoint (parametrized state, shadow weights) with its QuantRecord, as
    the vision trainer writes it, packs to exactly the values the model computes with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    compressor.quantize_(model, compressor.QuantConfig(bits=4, bucket_size=64, method=method))
    record = compressor.quantization_record(model)
    expected = compressor.quantized_state_dict(model)
    checkpoint = {"model": model.state_dict(), "qdistill": record.to_dict(), "epoch": 0}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    done = _qdistill("pack", "checkpoint.pth", "-o", "student.qd", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    loaded, _ = load_packed(tmp_path / "student.qd")
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
