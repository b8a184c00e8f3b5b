"""``qdistill pack`` and ``unpack`` never destroy a user's file, and bad input is one line
(issue 15, items 2 and 11): an output that is one of the inputs is refused (also through
links); an existing output is replaced only with ``--force``, and only when it is qdistill's
own earlier output; an output that is a directory, or a text file given as a checkpoint, is
a one-line error with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.cli.packed import pack_checkpoint, unpacked_by_us
from compressor.format.files import WRITTEN_BY
from compressor.format.packed import is_packed, load_packed, packed_info


def _qdistill(*args, cwd):
    exe = Path(sys.executable).with_name("qdistill")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _main(args, folder, monkeypatch, capsys):
    """``qdistill ARGS`` in this process: (exit status, the lines it wrote to stderr)."""
    from compressor.cli import main

    monkeypatch.chdir(folder)
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_line_error(done, message: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))


@pytest.fixture
def folder(tmp_path):
    """A teacher checkpoint ``teacher.pt`` and its packed file ``teacher.qd``."""
    torch.save(_model().state_dict(), tmp_path / "teacher.pt")
    pack_checkpoint(torch.load(tmp_path / "teacher.pt", weights_only=True), tmp_path / "teacher.qd")
    return tmp_path


# --------------------------------------------------------------------------------------------
# Item 2: an output that is one of the inputs.


def test_pack_refuses_to_write_over_its_input(folder):
    """``qdistill pack a.pt -o a.pt`` turned the fp32 checkpoint into a packed file, exit 0."""
    teacher = (folder / "teacher.pt").read_bytes()
    os.symlink("teacher.pt", folder / "link.qd")
    os.link(folder / "teacher.pt", folder / "hard.qd")
    for output in ("teacher.pt", "./teacher.pt", "link.qd", "hard.qd"):
        done = _qdistill("pack", "teacher.pt", "-o", output, "--force", cwd=folder)
        _one_line_error(done, "is also an input")
    done = _qdistill("pack", "teacher.pt", "-o", "teacher.pt", cwd=folder)
    _one_line_error(done, "is also an input")
    assert (folder / "teacher.pt").read_bytes() == teacher
    assert not is_packed(folder / "teacher.pt")


def test_unpack_refuses_to_write_over_its_input(folder, monkeypatch, capsys):
    """``qdistill unpack x.safetensors -o x.safetensors`` replaced the packed file."""
    done = _qdistill("pack", "teacher.pt", "-o", "x.safetensors", cwd=folder)
    assert done.returncode == 0, done.stderr
    packed = (folder / "x.safetensors").read_bytes()
    done = _qdistill("unpack", "x.safetensors", "-o", "x.safetensors", cwd=folder)
    _one_line_error(done, "is also an input")
    os.symlink("x.safetensors", folder / "link.safetensors")
    code, err = _main(
        ["unpack", "x.safetensors", "-o", "link.safetensors", "--force"],
        folder,
        monkeypatch,
        capsys,
    )
    assert code == 2 and len(err) == 1 and "is also an input" in err[0], err
    assert (folder / "x.safetensors").read_bytes() == packed


# --------------------------------------------------------------------------------------------
# Item 2: an existing output is replaced only with --force, and only if qdistill wrote it.


def test_pack_replaces_only_an_earlier_packed_file_and_only_with_force(folder, monkeypatch, capsys):
    torch.save(_model().state_dict(), folder / "student.pt")
    earlier = (folder / "teacher.qd").read_bytes()
    code, err = _main(["pack", "student.pt", "-o", "teacher.qd"], folder, monkeypatch, capsys)
    assert code == 2 and "exists; pass --force" in err[0], err
    assert (folder / "teacher.qd").read_bytes() == earlier
    args = ["pack", "student.pt", "-o", "teacher.qd", "--bits", "2", "--force"]
    assert _main(args, folder, monkeypatch, capsys)[0] == 0
    assert (folder / "teacher.qd").read_bytes() != earlier and is_packed(folder / "teacher.qd")
    # A file qdistill did not write (the user's teacher) is never replaced, --force or not.
    teacher = (folder / "teacher.pt").read_bytes()
    for force in ([], ["--force"]):
        args = ["pack", "student.pt", "-o", "teacher.pt", *force]
        code, err = _main(args, folder, monkeypatch, capsys)
        expected = "is not a file that qdistill pack wrote" if force else "pass --force"
        assert code == 2 and len(err) == 1 and expected in err[0], err
    assert (folder / "teacher.pt").read_bytes() == teacher


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_unpack_replaces_only_its_own_output_and_only_with_force(
    folder, suffix, monkeypatch, capsys
):
    out = f"student{suffix}"
    assert _main(["unpack", "teacher.qd", "-o", out], folder, monkeypatch, capsys)[0] == 0
    assert unpacked_by_us(folder / out)
    code, err = _main(["unpack", "teacher.qd", "-o", out], folder, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "exists; pass --force" in err[0], err
    args = ["unpack", "teacher.qd", "-o", out, "--force"]
    assert _main(args, folder, monkeypatch, capsys)[0] == 0
    # The user's own files of the same kind: refused even with --force, left as they were.
    state = _model().state_dict()
    mine = folder / f"mine{suffix}"
    if suffix == ".pt":
        torch.save(state, mine)
    else:
        save_file(state, mine, metadata={"format": "pt"})
    before = mine.read_bytes()
    assert not unpacked_by_us(mine)
    code, err = _main(
        ["unpack", "teacher.qd", "-o", mine.name, "--force"], folder, monkeypatch, capsys
    )
    assert code == 2 and len(err) == 1 and "is not a file that qdistill unpack wrote" in err[0]
    assert mine.read_bytes() == before


def test_unpacked_files_carry_a_marker_that_loading_ignores(folder, monkeypatch, capsys):
    """The .pt marker lives in the state dict's ``_metadata`` (module versions, which
    ``load_state_dict`` looks up by module prefix): it survives ``torch.load(weights_only=
    True)`` and the file still loads into the model, strictly, BatchNorm included."""
    for out in ("s.pt", "s.safetensors"):
        assert _main(["unpack", "teacher.qd", "-o", out], folder, monkeypatch, capsys)[0] == 0
    state = torch.load(folder / "s.pt", weights_only=True)
    assert isinstance(state, OrderedDict) and WRITTEN_BY in state._metadata
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # no key of ours
    expected, _ = load_packed(folder / "teacher.qd")
    for loaded in (state, load_file(folder / "s.safetensors")):
        model = _model()
        model.load_state_dict(loaded, strict=True)
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), name
    with safe_open(str(folder / "s.safetensors"), framework="pt") as handle:
        assert WRITTEN_BY in handle.metadata()
    # A plain state dict saved by the user has no marker; a model's own ``_metadata`` either.
    torch.save(_model().state_dict(), folder / "user.pt")
    assert not unpacked_by_us(folder / "user.pt")
    assert not unpacked_by_us(folder / "teacher.qd")


def test_unpack_marks_a_plugin_checkpoint_at_its_top_level(folder, monkeypatch, capsys):
    """A framework's checkpoint (a dict) carries the marker as a key of its own; a plugin
    that cannot rebuild the checkpoint is a one-line error."""
    import compressor.cli.packed as packed_cli

    def to_checkpoint(state, metadata):
        if "broken" in metadata:
            raise ValueError("the packed file holds no options")
        return {"model": dict(state), "epoch": 3}

    plugin = types.SimpleNamespace(to_checkpoint=to_checkpoint)
    monkeypatch.setattr(packed_cli, "checkpoint_formats", lambda: {"fake": plugin})
    state = torch.load(folder / "teacher.pt", weights_only=True)
    pack_checkpoint(state, folder / "fake.qd", metadata={"checkpoint_format": "fake"})
    pack_checkpoint(
        state, folder / "broken.qd", metadata={"checkpoint_format": "fake", "broken": 1}
    )
    assert _main(["unpack", "fake.qd", "-o", "f.pt"], folder, monkeypatch, capsys)[0] == 0
    checkpoint = torch.load(folder / "f.pt", weights_only=True)
    assert checkpoint[WRITTEN_BY] == "qdistill unpack" and checkpoint["epoch"] == 3
    assert (
        _main(["unpack", "fake.qd", "-o", "f.pt", "--force"], folder, monkeypatch, capsys)[0] == 0
    )
    code, err = _main(["unpack", "broken.qd", "-o", "b.pt"], folder, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "holds no options" in err[0], err
    assert not (folder / "b.pt").exists()


# --------------------------------------------------------------------------------------------
# Item 11: one-line errors instead of tracebacks.


def test_an_output_that_is_a_directory_is_a_one_line_error(folder):
    (folder / "out").mkdir()
    (folder / "out.pt").mkdir()
    _one_line_error(_qdistill("pack", "teacher.pt", "-o", "out", cwd=folder), "is a directory")
    _one_line_error(_qdistill("unpack", "teacher.qd", "-o", "out.pt", cwd=folder), "is a directory")
    assert not any((folder / "out").iterdir()) and not any((folder / "out.pt").iterdir())


def test_pack_creates_a_missing_output_folder(folder, monkeypatch, capsys):
    args = ["pack", "teacher.pt", "-o", "new/sub/t.qd"]
    assert _main(args, folder, monkeypatch, capsys)[0] == 0
    assert is_packed(folder / "new" / "sub" / "t.qd")


def test_a_text_file_given_as_a_checkpoint_says_so(folder, monkeypatch, capsys):
    """It reported ``not a PyTorch checkpoint that loads safely (weights_only): 101`` (or
    ``pop from empty list``, or torch's advice to retry with weights_only=False)."""
    for name, text in (("notes.pt", "epoch 3, loss 0.25\n"), ("hello.pt", "hello\n")):
        (folder / name).write_text(text)
        code, err = _main(["pack", name, "-o", "x.qd"], folder, monkeypatch, capsys)
        assert code == 2 and len(err) == 1, err
        assert f"{name} is a text file, not a checkpoint" in err[0] and "weights_only" not in err[0]
    (folder / "notes.safetensors").write_text("not a tensor file\n")
    done = _qdistill("pack", "notes.safetensors", "-o", "x.qd", cwd=folder)
    _one_line_error(done, "notes.safetensors is a text file, not a checkpoint")
    code, err = _main(["pack", "teacher.qd", "-o", "x.qd"], folder, monkeypatch, capsys)
    assert code == 2 and "already a packed file" in err[0], err
    assert not (folder / "x.qd").exists()


def test_inspect_writes_nothing_and_takes_no_output(folder, monkeypatch, capsys):
    before = sorted(p.name for p in folder.iterdir())
    assert _main(["inspect", "teacher.qd"], folder, monkeypatch, capsys)[0] == 0
    with pytest.raises(SystemExit) as exit_:
        _main(["inspect", "teacher.qd", "-o", "x.qd"], folder, monkeypatch, capsys)
    assert exit_.value.code == 2
    assert sorted(p.name for p in folder.iterdir()) == before


def test_unpack_writes_tied_tensors_to_safetensors(tmp_path, monkeypatch, capsys):
    """safetensors refuses tensors that share memory; a tied model's copy is written twice."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    model[1].weight = model[0].weight
    state = {**model.state_dict(), "e1.weight": torch.zeros(0, 3), "e2.weight": torch.zeros(0, 3)}
    pack_checkpoint(state, tmp_path / "tied.qd")
    rows = {r.name: r.coding for r in packed_info(tmp_path / "tied.qd")}
    assert rows["1.weight"] == "tied to 0.weight" and rows["e2.weight"] == "bitpack"
    for out in ("t.safetensors", "t.pt"):
        assert _main(["unpack", "tied.qd", "-o", out], tmp_path, monkeypatch, capsys)[0] == 0
    loaded = load_file(tmp_path / "t.safetensors")
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert state["0.weight"].data_ptr() == state["1.weight"].data_ptr()  # still tied
