"""The OpenNMT-py commands never destroy what the user hands them (issue 15, items 1, 2, 11):
`onmt-export-ct2 --force`, `onmt-quantize` and `onmt-eval --json`, on a real tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, run_command, train_tiny_onmt


def _one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5-step fp32 transformer on 200 toy en-de pairs (what CTranslate2 converts)."""
    folder = tmp_path_factory.mktemp("onmt_trust")
    train_tiny_onmt(
        folder,
        pairs=200,
        valid=10,
        vocab=200,
        encoder_type="transformer",
        decoder_type="transformer",
        heads=2,
        transformer_ff=32,
        position_encoding=True,
    )
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_force_never_removes_a_folder_it_did_not_write(tiny, tmp_path):
    """Item 1: `-o runs --force` deleted the checkpoints beside the source; `-o . --force`
    wiped the working directory."""
    pytest.importorskip("ctranslate2")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "teacher.pt").write_bytes((tiny / "m_step_5.pt").read_bytes())
    (runs / "notes.txt").write_text("my only copy\n")
    before = _snapshot(runs)
    export = [BIN / "qdistill", "onmt-export-ct2", runs / "teacher.pt", "--force", "-o"]
    _one_line_error(run_command([*export, runs], tmp_path), "contains the input")
    _one_line_error(run_command([*export, "."], runs), "contains the input")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    _one_line_error(
        run_command([*export, other], tmp_path), "not a directory that qdistill exported"
    )
    _one_line_error(run_command([*export, "."], other), "holds the working directory")
    assert _snapshot(runs) == before and (other / "notes.txt").read_text() == "mine\n"

    # Our own earlier export is replaced, but not once the user put a file of theirs in it.
    out = tmp_path / "ct2"
    assert run_command([*export[:-2], "-o", out], tmp_path).returncode == 0
    assert (out / "model.bin").is_file()
    done = run_command([*export, out], tmp_path)
    assert done.returncode == 0, done.stderr
    (out / "mine.txt").write_text("keep\n")
    _one_line_error(run_command([*export, out], tmp_path), "not a directory that qdistill exported")
    assert (out / "mine.txt").read_text() == "keep\n"


def test_onmt_quantize_refuses_its_input_and_foreign_files(tiny, tmp_path):
    """Item 2: `onmt-quantize a.pt -o a.pt` replaced the checkpoint and its optimizer."""
    source = tmp_path / "a.pt"
    source.write_bytes((tiny / "m_step_5.pt").read_bytes())
    (tmp_path / "link.pt").symlink_to(source)
    original = source.read_bytes()
    quantize = [BIN / "qdistill", "onmt-quantize", source]
    for output in (source, tmp_path / "link.pt"):
        for force in ([], ["--force"]):
            _one_line_error(
                run_command([*quantize, "-o", output, *force], tmp_path), "is also an input"
            )
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(original)
    _one_line_error(run_command([*quantize, "-o", foreign], tmp_path), "exists; pass --force")
    _one_line_error(run_command([*quantize, "-o", foreign, "--force"], tmp_path), "not a file that")
    assert source.read_bytes() == original and foreign.read_bytes() == original
    # Into a missing folder: created. Our own earlier output: replaced with --force only.
    out = tmp_path / "new" / "pm4.pt"
    assert run_command([*quantize, "-o", out], tmp_path).returncode == 0
    _one_line_error(run_command([*quantize, "-o", out], tmp_path), "exists; pass --force")
    assert run_command([*quantize, "-o", out, "--force", "--bits", "2"], tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bucket-size", "0"], "--bucket-size must be a positive"),
        (["--bucket-size", "-5"], "--bucket-size must be a positive"),
        (["--bits", "9"], "--bits must be from 1 to 8"),
    ],
)
def test_onmt_quantize_bad_flags_are_one_line(tiny, tmp_path, flags, message):
    done = run_command(
        [BIN / "qdistill", "onmt-quantize", tiny / "m_step_5.pt", "-o", tmp_path / "o.pt", *flags],
        tmp_path,
    )
    _one_line_error(done, message)
    assert not (tmp_path / "o.pt").exists()


def test_onmt_eval_json_never_replaces_an_input(tiny, tmp_path):
    """Item 2 and 11: `--json ref.txt` overwrote the reference; a missing folder failed after
    the whole evaluation; a binary --ref gave a traceback."""
    ref = tmp_path / "ref.txt"
    ref.write_text((tiny / "tgt-val.txt").read_text())
    hyp = tmp_path / "hyp.txt"
    hyp.write_text((tiny / "src-val.txt").read_text())
    before = ref.read_bytes()
    evaluate = [BIN / "qdistill", "onmt-eval", "--ref", ref, "--hyp", f"h={hyp}"]
    for target in (ref, hyp):
        for force in ([], ["--force"]):
            _one_line_error(
                run_command([*evaluate, "--json", target, *force], tmp_path), "also an input"
            )
    assert ref.read_bytes() == before
    binary = tmp_path / "ref.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    done = run_command([BIN / "qdistill", "onmt-eval", "--ref", binary, "--hyp", hyp], tmp_path)
    _one_line_error(done, "is not UTF-8 text")
    # A missing folder is created; the JSON is ours, so --force replaces it.
    out = tmp_path / "missing" / "m.json"
    assert run_command([*evaluate, "--json", out], tmp_path).returncode == 0
    assert json.loads(out.read_text())[0]["name"] == "h"
    _one_line_error(run_command([*evaluate, "--json", out], tmp_path), "exists; pass --force")
    assert run_command([*evaluate, "--json", out, "--force"], tmp_path).returncode == 0
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    _one_line_error(
        run_command([*evaluate, "--json", notes, "--force"], tmp_path), "not a file that"
    )
    assert notes.read_text() == '{"mine": 1}\n'


def test_onmt_eval_names_a_folder_that_is_not_a_ctranslate2_model(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("a b\n")
    (tmp_path / "folder").mkdir()
    evaluate = [BIN / "qdistill", "onmt-eval", "--src", ref, "--ref", ref]
    done = run_command([*evaluate, f"m={tmp_path / 'folder'}"], tmp_path)
    _one_line_error(done, "is a folder but not a CTranslate2 model directory")
    done = run_command([*evaluate, f"m={tmp_path / 'missing.pt'}"], tmp_path)
    _one_line_error(done, "does not exist")
    # the CTranslate2 translator never writes its hypotheses over its source
    translate = ["-m", "onmt_plugin.ct2_translate", "-model", tmp_path, "-src", ref]
    done = run_command([sys.executable, *translate, "-output", ref], tmp_path)
    _one_line_error(done, "is also an input")
    assert ref.read_text() == "a b\n"
    # and names every other mistake in one line, writing nothing
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes(b"")
    hyp = ["-output", tmp_path / "hyp.txt"]
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    for flags, message in (
        (["-model", tmp_path / "folder", "-src", ref], "is not a CTranslate2 model directory"),
        (["-model", tmp_path / "ct2", "-src", tmp_path / "missing.de"], "no such file"),
        (["-model", tmp_path / "ct2", "-src", ref, "-tgt", two], "must align line by line"),
        (["-model", tmp_path / "ct2", "-src", ref, "-transforms", "sentencepiece"], "needs"),
        (["-model", tmp_path / "ct2", "-src", ref, "-gpu", "0"], "CPU only"),
        (["-model", tmp_path / "ct2", "-src", ref], "CTranslate2 cannot load it"),
    ):
        done = run_command(
            [sys.executable, "-m", "onmt_plugin.ct2_translate", *flags, *hyp], tmp_path
        )
        _one_line_error(done, message)
    assert not (tmp_path / "hyp.txt").exists()
