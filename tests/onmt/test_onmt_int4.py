"""The int4 runtime in the user's OpenNMT-py tools (issue 16): a student distilled with
``onmt_train -quant_grid int4_kernel`` and packed runs in the stock ``onmt_translate`` on the
int4 kernel, ``QDISTILL_RUNTIME=fp32`` forces the decoded fp32 path, and ``qdistill onmt-eval``
says which path ran, with tokens/s and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, data_path

import compressor

pytestmark = pytest.mark.skipif(
    not compressor.int4_kernel_available(), reason="this PyTorch has no CPU int4 kernel"
)


def _run(args, cwd, runtime: str | None = None, check: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QDISTILL_ONMT_PLUGIN": "1"}
    if runtime is not None:
        env["QDISTILL_RUNTIME"] = runtime
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{args[:2]} failed:\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 2-layer teacher (10 steps) and a 1-layer 4-bit student distilled from it on the kernel
    grid (10 steps), packed; sizes in groups of 32."""
    folder = tmp_path_factory.mktemp("onmt_int4")
    toy = data_path("toy-ende")
    for name, lines in (("src-train", 300), ("tgt-train", 300), ("src-val", 20), ("tgt-val", 20)):
        text = (toy / f"{name}.txt").read_text().splitlines()[:lines]
        (folder / f"{name}.txt").write_text("\n".join(text) + "\n")
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "src_vocab_size": 300,
        "tgt_vocab_size": 300,
        "save_data": "vocab",
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"},
            "valid": {"path_src": "src-val.txt", "path_tgt": "tgt-val.txt"},
        },
        "encoder_type": "brnn",
        "decoder_type": "rnn",
        "rnn_type": "LSTM",
        "hidden_size": 64,
        "word_vec_size": 32,
        "batch_size": 16,
        "batch_type": "sents",
        "train_steps": 10,
        "save_checkpoint_steps": 10,
        "valid_steps": 10,
        "seed": 1,
        "num_workers": 0,
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    _run([BIN / "onmt_build_vocab", "-config", "c.yaml", "-n_sample", "300"], folder)
    _run(
        [BIN / "onmt_train", "-config", "c.yaml", "-layers", "2", "-save_model", "teacher"], folder
    )
    distill = _run(
        [
            BIN / "onmt_train",
            "-config",
            "c.yaml",
            "-layers",
            "1",
            "-save_model",
            "student",
            "-quantized_distill",
            "-teacher_model",
            "teacher_step_10.pt",
            "-quant_grid",
            "int4_kernel",
            "-quant_bucket_size",
            "32",
        ],
        folder,
    )
    assert "int4 kernel grid" in distill.stderr + distill.stdout
    _run([BIN / "qdistill", "pack", "student_step_10.pt", "-o", "student.qd"], folder)
    _run([BIN / "qdistill", "pack", "teacher_step_10.pt", "-o", "teacher.qd"], folder)
    return folder


def _translate(folder: Path, model: str, out: str, runtime: str | None = None, check=True):
    args = [
        BIN / "onmt_translate",
        "-model",
        model,
        "-src",
        "src-val.txt",
        "-output",
        out,
        "-gpu",
        "-1",
        "-beam_size",
        "3",
    ]
    return _run(args, folder, runtime, check)


def test_the_student_is_on_the_kernel_grid(student):
    specs = {i.name: i.spec for i in compressor.packed_info(student / "student.qd") if i.spec}
    assert specs["generator.weight"].method == "int4_kernel"
    assert specs["decoder.rnn.layers.0.weight_hh"].method == "int4_kernel"
    assert specs["encoder.rnn.weight_ih_l0"].method == "int4_kernel"
    shown = _run([BIN / "qdistill", "inspect", "student.qd"], student).stdout
    assert "run on the int4 kernel" in shown


def test_onmt_translate_runs_the_student_on_int4_and_fp32_on_request(student):
    on_int4 = _translate(student, "student.qd", "int4.txt")
    assert "qdistill: runtime int4 (modules:" in on_int4.stderr
    forced = _translate(student, "student.qd", "fp32.txt", runtime="fp32")
    assert "qdistill: runtime fp32 (QDISTILL_RUNTIME=fp32)" in forced.stderr
    int4 = (student / "int4.txt").read_text().splitlines()
    fp32 = (student / "fp32.txt").read_text().splitlines()
    assert len(int4) == len(fp32) == 20
    # bf16 activations may change a near-tie in the search, rarely: most sentences agree.
    assert sum(a == b for a, b in zip(int4, fp32)) >= 16


def test_a_model_off_the_kernel_grid_runs_fp32_and_int4_cannot_be_forced(student):
    done = _translate(student, "teacher.qd", "t.txt")
    assert (
        "qdistill: runtime fp32 (the model was not trained on the int4 kernel grid)" in done.stderr
    )
    refused = _translate(student, "teacher.qd", "t.txt", runtime="int4", check=False)
    assert refused.returncode == 2
    assert "QDISTILL_RUNTIME=int4 but the model was not trained" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_onmt_eval_reports_path_speed_and_memory(student):
    done = _run(
        [
            BIN / "qdistill",
            "onmt-eval",
            "int4=student.qd",
            "fp32=student.qd",
            "teacher=teacher_step_10.pt",
            "--fp32",
            "fp32",
            "--src",
            "src-val.txt",
            "--ref",
            "tgt-val.txt",
            "--json",
            "e.json",
        ],
        student,
    )
    rows = {r["name"]: r for r in json.loads((student / "e.json").read_text())}
    assert rows["int4"]["runtime"] == "int4" and rows["fp32"]["runtime"] == "fp32"
    assert rows["teacher"]["runtime"] == "fp32"
    for row in rows.values():
        assert row["peak_rss_mib"] > 50 and row["decode_tokens_per_s"] > 0
    assert "RSS MiB" in done.stdout
