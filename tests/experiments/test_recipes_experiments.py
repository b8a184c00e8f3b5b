"""Experiment recipes: every recipe runs end to end in smoke mode on the real data, writes its
result file, and resumes from what it already has."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import QDISTILL, ROOT

from compressor import load_packed, packed_info
from recipes import cifar
from recipes.experiments import RecipeError, list_recipes, load_recipe, run_recipe


def _qdistill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QDISTILL, *args], capture_output=True, text=True, timeout=600)


def test_list_names_every_recipe_with_its_scales():
    assert {r.name for r in list_recipes()} >= {"cifar10", "multi30k", "toy-ende"}
    done = _qdistill("recipe", "list")
    assert done.returncode == 0
    for name in ("cifar10", "multi30k", "toy-ende"):
        assert name in done.stdout
    assert "scales: cpu, paper" in done.stdout


def test_cifar10_smoke_writes_every_configuration_and_resumes(
    cifar10_dir, tmp_path, capsys, monkeypatch
):
    recipe = load_recipe("cifar10")
    result = run_recipe(recipe, "cpu", tmp_path, smoke=True, data_root=cifar10_dir.parent)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {
        "teacher",
        "student_fp32",
        "student_fp32_distilled",
        "pm_2",
        "pm_4",
        "pm_8",
        "qd_2",
        "qd_4",
        "qd_8",
        "qd_4_kernel",
        "dq_2",
        "dq_4",
        "dq_2_points",
        "dq_4_points",
        *cifar.QKD_ABLATION,
    }
    assert rows["teacher"]["packed_bytes"] is None
    # The ablation: every row says how it ran; W2A2 has three seeds, QKD its phases.
    assert {"qat_w2a2_seed2", "qat_kd_w2a2_seed1", "qkd_w3a3", "qkd_w2a2_seed2"} <= set(rows)
    for name in cifar.QKD_ABLATION:
        assert rows[name]["settings"]["bits"] == rows[name]["bits"], name
        assert 0 < rows[name]["packed_bytes"] < rows[name]["fp32_bytes"], name
    assert rows["qkd_w2a2_seed1"]["settings"]["seed"] == 1
    assert sum(rows["qkd_w2a2"]["phases"].values()) == 3
    assert "co_studied_teacher_accuracy" in rows["qkd_w2a2"]
    for name in ("pm_2", "qd_4", "dq_2", "qkd_w4a4"):
        assert 0 < rows[name]["packed_bytes"] < rows[name]["fp32_bytes"], name
        assert (tmp_path / "work" / f"{name}.qd").stat().st_size == rows[name]["packed_bytes"]
        ans = tmp_path / "work" / f"{name}.ans.qd"  # the same weights, entropy-coded
        assert ans.stat().st_size == rows[name]["packed_bytes_ans"]
        plain, _ = load_packed(tmp_path / "work" / f"{name}.qd")
        coded, _ = load_packed(ans)
        assert plain.keys() == coded.keys()
        assert all(torch.equal(plain[k], coded[k]) for k in plain), name
    # The kernel-grid row: its Linear weights on the int4 kernel's grid, convolutions not.
    methods = {i.spec.method for i in packed_info(tmp_path / "work" / "qd_4_kernel.qd") if i.spec}
    assert methods == {"uniform", "int4_kernel"}
    pm_bytes = [rows[f"pm_{bits}"]["packed_bytes"] for bits in (2, 4, 8)]
    assert pm_bytes == sorted(pm_bytes) and len(set(pm_bytes)) == 3
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["parameters"]["steps"] == 3 and saved["environment"]["torch"]
    # Interrupted after qd_4: its result and everything after it are missing; a rerun redoes
    # only those and gives the same figures.
    for name in ("qd_4", "qd_8", "dq_2", "dq_4", "qkd_w4a4"):
        (tmp_path / "results" / f"{name}.json").unlink()
    # A result run with other settings (here: QKD's phases of an older version) is redone.
    stale = tmp_path / "results" / "qkd_w3a3.json"
    old = json.loads(stale.read_text())
    old["settings"]["phases"] = [1, 1, 1]
    stale.write_text(json.dumps(old))
    capsys.readouterr()
    again = run_recipe(recipe, "cpu", tmp_path, smoke=True, data_root=cifar10_dir.parent)
    log = capsys.readouterr().out
    assert "teacher                    cached" in log and "qd_2" in log
    assert "qd_4                       cached" not in log
    assert (
        "qkd_w3a3                   cached" not in log
        and "qat_w3a3                   cached" in log
    )
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in result["rows"]]
    # The report's QKD section reads these results: one line per bit width, each with its
    # verdict; W2A2 with three seeds has a standard error.
    from benchmarks import report

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "cifar").symlink_to(tmp_path / "results")
    monkeypatch.setattr(report, "RESULTS", tmp_path / "report")
    lines = []
    report._qkd_section(lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("| W/A bits"))
    table = lines[header + 2 : lines.index("", header)]
    assert [line.split(" |")[0] for line in table] == ["| W4A4", "| W3A3", "| W2A2"]
    assert "(n=3)" in table[2] and "±" in table[2] and "(n=1)" in table[0]
    verdicts = [line for line in lines if line.startswith("- W")]
    assert len(verdicts) == 3 and all("goal +0.5" in v for v in verdicts[1:])


def test_bench_cifar_shares_the_ablation_out_among_workers(cifar10_dir, tmp_path):
    """``--workers 2``: the shared teacher and student are trained once, the rows run in two
    one-thread processes, and a second run finds every row done."""
    import os
    import sys

    def bench(*flags):
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_cifar", "--train-images", "256"]
            + ["--test-images", "128", "--steps", "3", "--output-dir", str(tmp_path), *flags],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "QDISTILL_DATA": str(cifar10_dir.parent)},
            timeout=300,
        )

    rows = ["qat_kd_w2a2", "qkd_w2a2"]
    done = bench("--only", *rows, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in rows:
        result = json.loads((tmp_path / "cifar" / f"{name}.json").read_text())
        assert result["settings"]["method"] == name.rpartition("_w")[0]
    assert sorted(p.name for p in (tmp_path / "work").glob("*.pt")) == [
        "student_fp32.pt",
        "teacher.pt",
    ]
    again = bench("--only", *rows, "--workers", "2")
    assert again.returncode == 0 and all(f"{n:<26} cached" in again.stdout for n in rows)
    wrong = bench("--workers", "0")
    assert wrong.returncode == 2 and "--workers must be 1 or more" in wrong.stderr


@pytest.mark.parametrize("name, data", [("toy-ende", "toy-ende"), ("multi30k", "multi30k")])
def test_translation_recipe_smoke(name, data, tmp_path):
    from conftest import data_path

    root = data_path(data).parent
    done = _qdistill(
        "recipe", "run", name, "--smoke", "--output-dir", str(tmp_path), "--data-path", str(root)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    # multi30k's smoke scale also runs sequence-level distillation (toy-ende's does not)
    seqkd = ("student_seqkd4", "student_seqkd4_wkd") if name == "multi30k" else ()
    assert set(rows) == {"teacher", "student_qd4", "teacher_pm4", *seqkd}
    assert rows["student_qd4"]["bytes"] == (tmp_path / "work" / "student_qd4.qd").stat().st_size
    assert rows["teacher_pm4"]["bytes"] < rows["teacher"]["bytes"]
    for packed in ("student_qd4", "teacher_pm4", *seqkd):  # also entropy-coded: the same weights
        ans = tmp_path / "work" / f"{packed}.ans.qd"
        assert rows[packed]["bytes_ans"] == ans.stat().st_size
        plain, _ = load_packed(tmp_path / "work" / f"{packed}.qd")
        coded, _ = load_packed(ans)
        assert plain.keys() == coded.keys()
        assert all(torch.equal(plain[k], coded[k]) for k in plain), packed
    assert "teacher" in rows and "bytes_ans" not in rows["teacher"]
    assert all(r["bleu"] is not None and r["ppl_word"] > 1 for r in rows.values())
    assert all(r["agreement_bleu"] is not None and r["compression"] for r in rows.values())
    if seqkd:
        work = tmp_path / "work"
        train_src = (work / "data" / "train.src").read_text().splitlines()
        assert len((work / "data" / "train.seqkd.tgt").read_text().splitlines()) == len(train_src)
        for packed in seqkd:  # trained on the teacher's translations, references for validation
            config = (work / f"{packed}.yaml").read_text()
            assert "train.seqkd.tgt" in config and "valid.tgt" in config
            assert rows[packed]["seqkd"]["lines"] == len(train_src)
            assert rows[packed]["seqkd"]["seconds"] >= 0
        assert "-distill_alpha 0.0 " in (work / "student_seqkd4.log").read_text()
        assert "-distill_alpha 0.7 " in (work / "student_seqkd4_wkd.log").read_text()
        assert "translated the 300 training sentences" in (work / "report.md").read_text()
    assert (tmp_path / "work" / "report.md").exists()
    assert (tmp_path / "work" / "bleu_vs_size.png").stat().st_size > 1000
    # Everything is there: a second run only reads it back.
    again = _qdistill(
        "recipe", "run", name, "--smoke", "--output-dir", str(tmp_path), "--data-path", str(root)
    )
    assert again.returncode == 0 and "Step " not in again.stdout


def test_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="no recipe 'nope'; known recipes: cifar10"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nengine: cifar\ndata: cifar10\nscales:\n  cpu: {stepz: 3}\n")
    with pytest.raises(RecipeError, match=r"unknown parameters \['stepz'\] for the cifar engine"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="has no scale 'huge'"):
        load_recipe("cifar10").parameters("huge")
    done = _qdistill(
        "recipe",
        "run",
        "cifar10",
        "--smoke",
        "--output-dir",
        str(tmp_path),
        "--data-path",
        str(tmp_path),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "data folder" in done.stderr and "not found" in done.stderr


def test_long_student_experiment_keeps_the_multi30k_teacher():
    from benchmarks.bench_translation import EXPERIMENTS

    main = load_recipe("multi30k").parameters("cpu")
    long = load_recipe(EXPERIMENTS["long"].recipe).parameters("cpu")
    same = ("vocab_size", "hidden_size", "teacher_steps", "batch_tokens", "threads")
    assert {k: long[k] for k in same} == {k: main[k] for k in same}
    assert long["student_steps"] > main["student_steps"] and long["bits"] == [4]


def test_seqkd_experiment_compresses_the_shipped_multi30k_teacher():
    """The seqkd benchmark reuses the shipped translator as its teacher: that is only fair
    while the translator is the multi30k recipe's cpu teacher and the students match."""
    from benchmarks.bench_translation import EXPERIMENTS
    from onmt_plugin import pretrained

    main = load_recipe("multi30k").parameters("cpu")
    seqkd = load_recipe(EXPERIMENTS["seqkd"].recipe).parameters("cpu")
    card = pretrained.card()
    assert EXPERIMENTS["seqkd"].shipped_teacher
    assert (card["train_steps"], card["vocab_size"], card["hidden_size"]) == (
        main["teacher_steps"],
        main["vocab_size"],
        main["hidden_size"],
    )
    same = ("vocab_size", "hidden_size", "teacher_steps", "student_steps", "batch_tokens")
    assert {k: seqkd[k] for k in same} == {k: main[k] for k in same}
    assert seqkd["seqkd"] and seqkd["bits"] == [4] and seqkd["seqkd_beam"] == 5


def test_an_existing_teacher_is_refused_for_a_vision_recipe(tmp_path, cifar10_dir):
    with pytest.raises(RecipeError, match="existing teacher"):
        run_recipe(
            load_recipe("cifar10"),
            "cpu",
            tmp_path,
            smoke=True,
            data_root=cifar10_dir.parent,
            teacher=tmp_path / "teacher.pt",
        )


def test_int4_transformer_report_judges_each_goal_from_the_measured_result():
    # The committed measurement, with one speed-up changed to cross its goal: each row's
    # verdict follows its own figure, and weights resident are counted without the position
    # tables that loading rebuilds (the same 9.8 MiB on either path).
    import copy

    from benchmarks.bench_int4 import transformer_report

    result = json.loads((ROOT / "benchmarks" / "results" / "int4_transformer.json").read_text())
    section = copy.deepcopy(result["transformer"])
    section["speed"]["greedy_batch1"]["speedup"] = 2.1
    text = transformer_report(section, result["config"])
    rows = {
        line.split(" | ")[0][2:]: line
        for line in text.splitlines()
        if line.startswith(("| greedy", "| beam"))
    }
    assert ">= 2.0x: met" in rows["greedy, batch1"] and "2.10x" in rows["greedy, batch1"]
    assert ">= 2.0x: missed" in rows["beam5, batch1"] and len(rows) == 4
    assert "best of 3 runs" in text
    memory = next(line for line in text.splitlines() if "weights resident" in line)
    assert "goal 6x: met" in memory and "(9.8 MiB, rebuilt at load" in memory
    section["bytes"]["rebuilt_tables"] = 0  # counted in: 13.2 against 34.5 MiB, 2.6x
    memory = next(line for line in transformer_report(section).splitlines() if "resident" in line)
    assert "goal 6x: missed" in memory
