"""`qdistill onmt-eval` on a real tiny OpenNMT-py model trained on a slice of toy en-de."""

from __future__ import annotations

import json

import pytest
from conftest import BIN, run_command, train_tiny_onmt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5-step fp32 RNN on 300 toy en-de pairs."""
    folder = tmp_path_factory.mktemp("onmt_eval")
    train_tiny_onmt(folder, pairs=300, valid=20, vocab=300, encoder_type="rnn", decoder_type="rnn")
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
    done = run_command(args, tiny)
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
    done = run_command(
        [BIN / "qdistill", "onmt-eval", "--ref", "tgt-val.txt", "--hyp", short], tiny
    )
    assert done.returncode == 2
    assert "must align line by line" in done.stderr and "Traceback" not in done.stderr
