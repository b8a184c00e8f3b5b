"""The OpenNMT-py commands never destroy what the user hands them (issue 15, items 1, 2, 11):
`onmt-export-ct2 --force`, `onmt-quantize` and `onmt-eval --json`, on a real tiny model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def _one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5-step fp32 transformer on 200 toy en-de pairs (what CTranslate2 converts)."""
    from conftest import data_path

    toy = data_path("toy-ende")
    folder = tmp_path_factory.mktemp("onmt_trust")
    for name, n in (("src-train", 200), ("tgt-train", 200), ("src-val", 10), ("tgt-val", 10)):
        lines = (toy / f"{name}.txt").read_text().splitlines()[:n]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "save_data": "vocab",
        "src_vocab_size": 200,
        "tgt_vocab_size": 200,
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"},
            "valid": {"path_src": "src-val.txt", "path_tgt": "tgt-val.txt"},
        },
        "encoder_type": "transformer",
        "decoder_type": "transformer",
        "layers": 1,
        "heads": 2,
        "hidden_size": 16,
        "word_vec_size": 16,
        "transformer_ff": 32,
        "position_encoding": True,
        "batch_size": 16,
        "batch_type": "sents",
        "train_steps": 5,
        "save_checkpoint_steps": 5,
        "valid_steps": 5,
        "seed": 1,
        "num_workers": 0,
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    assert _run([BIN / "onmt_build_vocab", "-config", "c.yaml", "-n_sample", "200"], folder)
    done = _run([BIN / "onmt_train", "-config", "c.yaml", "-save_model", "m"], folder)
    assert done.returncode == 0, done.stderr[-2000:]
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
    _one_line_error(_run([*export, runs], tmp_path), "contains the input")
    _one_line_error(_run([*export, "."], runs), "contains the input")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    _one_line_error(_run([*export, other], tmp_path), "not a directory that qdistill exported")
    _one_line_error(_run([*export, "."], other), "holds the working directory")
    assert _snapshot(runs) == before and (other / "notes.txt").read_text() == "mine\n"

    # Our own earlier export is replaced, but not once the user put a file of theirs in it.
    out = tmp_path / "ct2"
    assert _run([*export[:-2], "-o", out], tmp_path).returncode == 0
    assert (out / "model.bin").is_file()
    done = _run([*export, out], tmp_path)
    assert done.returncode == 0, done.stderr
    (out / "mine.txt").write_text("keep\n")
    _one_line_error(_run([*export, out], tmp_path), "not a directory that qdistill exported")
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
            _one_line_error(_run([*quantize, "-o", output, *force], tmp_path), "is also an input")
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(original)
    _one_line_error(_run([*quantize, "-o", foreign], tmp_path), "exists; pass --force")
    _one_line_error(_run([*quantize, "-o", foreign, "--force"], tmp_path), "not a file that")
    assert source.read_bytes() == original and foreign.read_bytes() == original
    # Into a missing folder: created. Our own earlier output: replaced with --force only.
    out = tmp_path / "new" / "pm4.pt"
    assert _run([*quantize, "-o", out], tmp_path).returncode == 0
    _one_line_error(_run([*quantize, "-o", out], tmp_path), "exists; pass --force")
    assert _run([*quantize, "-o", out, "--force", "--bits", "2"], tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bucket-size", "0"], "--bucket-size must be a positive"),
        (["--bucket-size", "-5"], "--bucket-size must be a positive"),
        (["--bits", "9"], "--bits must be from 1 to 8"),
    ],
)
def test_onmt_quantize_bad_flags_are_one_line(tiny, tmp_path, flags, message):
    done = _run(
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
            _one_line_error(_run([*evaluate, "--json", target, *force], tmp_path), "also an input")
    assert ref.read_bytes() == before
    binary = tmp_path / "ref.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    done = _run([BIN / "qdistill", "onmt-eval", "--ref", binary, "--hyp", hyp], tmp_path)
    _one_line_error(done, "is not UTF-8 text")
    # A missing folder is created; the JSON is ours, so --force replaces it.
    out = tmp_path / "missing" / "m.json"
    assert _run([*evaluate, "--json", out], tmp_path).returncode == 0
    assert json.loads(out.read_text())[0]["name"] == "h"
    _one_line_error(_run([*evaluate, "--json", out], tmp_path), "exists; pass --force")
    assert _run([*evaluate, "--json", out, "--force"], tmp_path).returncode == 0
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    _one_line_error(_run([*evaluate, "--json", notes, "--force"], tmp_path), "not a file that")
    assert notes.read_text() == '{"mine": 1}\n'
