"""The translator that ships with qdistill (issue 18): small enough to ship, rebuilt as an
ordinary OpenNMT-py checkpoint that the stock tools load, still scoring what its card says, and
compressed end to end by ``make demo`` as a user's existing model."""

from __future__ import annotations

import gzip
import json

import pytest
import sacrebleu
from conftest import BIN, ROOT, run_command

import compressor
from compressor.format.files import CheckpointError, OutputError
from onmt_plugin import pretrained

SHIPPED = pretrained.MULTI30K_DE_EN
SAMPLE = ROOT / "onmt_plugin" / "demo_data" / "multi30k"


def _lines(path, count):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [next(handle).rstrip("\n") for _ in range(count)]


def test_the_shipped_translator_fits_in_12_mb_and_says_where_it_came_from():
    total = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert total <= 12_000_000
    card = pretrained.card()
    assert card["command"] == "python -m recipes.pretrained"
    assert card["beam5"]["fp16"]["bleu"] > 35  # a trained translator, not a toy
    # The fp16 storage costs at most a few hundredths of a BLEU point.
    assert abs(card["fp16_bleu_change"]["beam5"]) < 0.3


def test_the_shipped_translator_reproduces_its_recorded_bleu(tmp_path):
    """The rebuilt checkpoint, translated by the stock onmt_translate with its own subwords,
    scores on the first test sentences what the card recorded when it was made."""
    card = pretrained.card()
    count = card["subset"]["sentences"]
    teacher = pretrained.write_checkpoint(SHIPPED, tmp_path / "teacher.pt")
    (tmp_path / "src.txt").write_text("\n".join(_lines(SAMPLE / "test.de.gz", count)) + "\n")
    done = run_command(
        [
            BIN / "onmt_translate",
            "-model",
            teacher,
            "-src",
            "src.txt",
            "-output",
            "hyp.txt",
            "-gpu",
            "-1",
            "-beam_size",
            "1",
            "-batch_size",
            "32",
            "-transforms",
            "sentencepiece",
            "-src_subword_model",
            "spm.src.model",
            "-tgt_subword_model",
            "spm.tgt.model",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    hyps = (tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()
    refs = _lines(SAMPLE / "test.en.gz", count)
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert bleu == pytest.approx(card["subset"]["bleu"], abs=0.5)


def test_rebuilding_the_checkpoint_never_replaces_a_foreign_file(tmp_path):
    foreign = tmp_path / "teacher.pt"
    foreign.write_bytes(b"a user's own file")
    with pytest.raises(OutputError, match="exists"):
        pretrained.write_checkpoint(SHIPPED, foreign)
    with pytest.raises(OutputError, match="not a file that"):
        pretrained.write_checkpoint(SHIPPED, foreign, force=True)
    assert foreign.read_bytes() == b"a user's own file"
    ours = pretrained.write_checkpoint(SHIPPED, tmp_path / "ours.pt")
    pretrained.write_checkpoint(SHIPPED, ours, force=True)  # its own earlier output
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        pretrained.load(tmp_path)
    cli = run_command(
        [
            BIN / "python",
            "-m",
            "onmt_plugin.pretrained",
            "checkpoint",
            tmp_path,
            "-o",
            tmp_path / "x.pt",
        ],
        tmp_path,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.count("\n") == 1 and "lacks model.safetensors" in cli.stderr


@pytest.mark.skipif(
    not compressor.int4_kernel_available(), reason="this PyTorch has no CPU int4 kernel"
)
def test_demo_compresses_the_shipped_translator(tmp_path):
    """``make demo``'s flow at a few steps: the shipped teacher is compressed as it is (not
    trained), the student runs on the int4 kernel and once more on the fp32 path."""
    data = tmp_path / "data"
    data.mkdir()
    for split, count in (("train", 300), ("val", 20), ("test", 20)):
        for lang in ("de", "en"):
            lines = _lines(SAMPLE / f"{split}.{lang}.gz", count)
            (data / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    done = run_command(
        [
            BIN / "python",
            "-m",
            "onmt_plugin.demo",
            "--output-dir",
            out,
            "--data-path",
            data,
            "--student-steps",
            "4",
            "--threads",
            "1",
        ],
        tmp_path,
        env={"QDISTILL_ONMT_PLUGIN": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(out.glob("teacher_step_*.pt"))  # the teacher was not trained
    rows = {row["name"]: row for row in json.loads((out / "eval.json").read_text())}
    assert set(rows) == {"teacher", "student_qd4", "student_qd4_fp32path", "teacher_pm4"}
    assert rows["student_qd4"]["runtime"] == "int4"
    assert rows["student_qd4_fp32path"]["runtime"] == "fp32"
    assert rows["teacher"]["bleu"] > 20  # the trained teacher, on 20 test sentences
    assert rows["student_qd4"]["bytes"] * 7 < rows["teacher"]["bytes"]
    report = (out / "report.md").read_text()
    assert "existing, trained checkpoint" in report and "| int4 |" in report
