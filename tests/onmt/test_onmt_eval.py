"""`qdistill onmt-eval` on a real tiny OpenNMT-py model trained on a slice of toy en-de."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from conftest import BIN


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env)
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import data_path

    toy = data_path("toy-ende")
    folder = tmp_path_factory.mktemp("onmt_eval")
    for name, n in (("src-train", 300), ("tgt-train", 300), ("src-val", 20), ("tgt-val", 20)):
        lines = (toy / f"{name}.txt").read_text().splitlines()[:n]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "save_data": "vocab",
        "src_vocab_size": 300,
        "tgt_vocab_size": 300,
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"},
            "valid": {"path_src": "src-val.txt", "path_tgt": "tgt-val.txt"},
        },
        "encoder_type": "rnn",
        "decoder_type": "rnn",
        "layers": 1,
        "hidden_size": 16,
        "word_vec_size": 16,
        "batch_size": 16,
        "batch_type": "sents",
        "train_steps": 5,
        "save_checkpoint_steps": 5,
        "valid_steps": 5,
        "seed": 1,
        "num_workers": 0,
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    assert (
        _run([BIN / "onmt_build_vocab", "-config", "c.yaml", "-n_sample", "300"], folder).returncode
        == 0
    )
    done = _run([BIN / "onmt_train", "-config", "c.yaml", "-save_model", "m"], folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def test_references_against_themselves_score_100(tmp_path):
    from onmt_plugin.evaluate import score_lines

    refs = ["a man rides a horse .", "two dogs play in the snow ."]
    bleu, chrf, sig, _ = score_lines(refs, refs)
    assert bleu == pytest.approx(100.0) and chrf == pytest.approx(100.0)
    assert "nrefs:1" in sig
    bleu_bad, *_ = score_lines(["a cat", "one bird"], refs)
    assert bleu_bad < 10


def test_cli_scores_hypothesis_file_and_model(tiny, tmp_path):
    out = tmp_path / "m.json"
    args = [
        BIN / "qdistill",
        "onmt-eval",
        "teacher=m_step_5.pt",
        "--src",
        "src-val.txt",
        "--ref",
        "tgt-val.txt",
        "--hyp",
        "self=tgt-val.txt",
        "--baseline",
        "teacher",
        "--teacher",
        "teacher",
        "--json",
        out,
    ]
    done = _run(args, tiny)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["self"]["bleu"] == pytest.approx(100.0)
    teacher = rows["teacher"]
    assert teacher["bytes"] == (tiny / "m_step_5.pt").stat().st_size
    assert teacher["compression"] == pytest.approx(1.0)
    assert teacher["agreement_bleu"] == pytest.approx(100.0)
    # A 5-step model is far from the references: per-word perplexity in the tens or more.
    assert teacher["ppl_word"] > 10 and teacher["tokens_per_s"] > 0
    assert 0 <= teacher["bleu"] < 100
    assert "BLEU signature" in done.stdout


def test_mismatched_files_are_a_one_line_error(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    done = _run([BIN / "qdistill", "onmt-eval", "--ref", "tgt-val.txt", "--hyp", short], tiny)
    assert done.returncode == 2
    assert "must align line by line" in done.stderr and "Traceback" not in done.stderr
