"""What quantized distillation costs in training time: one step of a 4-bit student trained
against its teacher, as a ratio to one plain fp32 step of the same student without a teacher,
on the same batches, timed in the same run.

- vision: the CIFAR-10 recipe's student and teacher (their architectures at the chosen scale),
  ``distill_step`` on one batch, ten steps a sample.
- translation: the stock ``onmt_train`` on the Multi30k sample, the 1-layer student started
  from the 2-layer teacher's first layers (the multi30k recipe's models, or ``make demo``'s),
  plainly, with ``-quantized_distill`` and with ``-distill_topk 8``; the time per step is read
  from the timestamps of OpenNMT's own step log lines over the second half of each run
  (start-up, warm-up and the top-k cache's first epoch excluded).

    python -m benchmarks.bench_training_cost [--repeats 5] [--onmt-steps 120] [--only vision]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import yaml

import compressor
from benchmarks.bench_inference import ROOT, TRANSLATION_DIRS
from benchmarks.common import (
    interleaved_timings,
    kept_figures,
    load_result,
    ratio,
    timings,
    write_result,
)
from compressor.format.files import atomic_write_text
from compressor.training.step import DistillConfig, distill_step, freeze_
from recipes import small_runs as runs
from recipes.experiments import load_recipe

_STEP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO\] Step (\d+)/", re.M)


def vision(scale: str, repeats: int) -> dict:
    cfg = runs.SmallRunConfig(**load_recipe("cifar10").parameters(scale))
    data = runs.load_cifar10(runs.data_root(), 512, 64, cfg.seed, "cpu")
    teacher = freeze_(runs.tiny_cnn(cfg.teacher_width, cfg.teacher_depth))
    table = runs.teacher_logit_table(teacher, data)
    build = timings(lambda: runs.teacher_logit_table(teacher, data), repeats=5)
    per_view = build["median_s"] / table[..., 0].numel()  # seconds per image and view
    inputs, target, logits = next(runs.batches(data, cfg.batch_size, cfg.seed, table))
    students = {
        "plain": runs.student(cfg),
        "teacher": runs.student(cfg),
        "table": runs.student(cfg),
    }
    for name in ("teacher", "table"):
        compressor.quantize_(students[name], compressor.QuantConfig(bits=4))
    optimizers = {
        n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in students.items()
    }
    sources = {"plain": None, "teacher": teacher, "table": logits}
    config = DistillConfig(cfg.temperature, cfg.alpha)

    def steps(name: str):
        # Ten steps a sample: a single 70 ms step is at the mercy of this machine's noise.
        model, source, optimizer = students[name], sources[name], optimizers[name]
        return lambda: [
            distill_step(model, source, inputs, target, optimizer, config) for _ in range(10)
        ]

    rows = interleaved_timings({name: steps(name) for name in students}, repeats)
    plain = rows["plain"]
    # Building the table costs one teacher forward per image and view, once: spread over a
    # whole recipe run of cfg.steps steps on cfg.train_images images.
    step_s = {name: row["median_s"] / 10 for name, row in rows.items()}
    with_table_cost = (step_s["table"] * cfg.steps + per_view * 2 * cfg.train_images) / (
        step_s["plain"] * cfg.steps
    )
    return {
        "setup": f"CIFAR-10 CNN student (depth {cfg.student_depth}, width {cfg.student_width}) "
        f"and teacher (depth {cfg.teacher_depth}, width {cfg.teacher_width}), batch "
        f"{cfg.batch_size}, ten steps a sample, the three variants timed in turn",
        "plain_fp32_step": plain,
        "quantized_distillation_step": rows["teacher"],
        "quantized_distillation_teacher_table_step": rows["table"],
        "ratio": ratio(rows["teacher"], plain),
        "ratio_teacher_table": ratio(rows["table"], plain),
        "teacher_table_s_per_image_view": per_view,
        "ratio_teacher_table_with_its_cost": with_table_cost,
    }


def _seconds_per_step(log: str, after: int) -> float:
    """Seconds per step between OpenNMT's first step line past ``after`` and its last one."""
    stamps = [
        (int(step), datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f"))
        for t, step in _STEP.findall(log)
        if int(step) >= after
    ]
    if len(stamps) < 2:
        raise RuntimeError(f"onmt_train reported fewer than two steps past {after}:\n{log[-2000:]}")
    (first_step, first), (last_step, last) = stamps[0], stamps[-1]
    return (last - first).total_seconds() / (last_step - first_step)


def translation(
    folder: Path, steps: int, repeats: int, threads: int, pairs: int, top_k: int
) -> dict:
    """Plain, quantized-distillation and top-k cached quantized-distillation ``onmt_train``
    runs, interleaved, on the first ``pairs`` training pairs: small enough that the timed
    second half of the run is past the first epoch, where the top-k cache is warm."""
    config = yaml.safe_load((folder / "student_qd4.yaml").read_text())
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = ["-train_from", str(folder / "student_init.pt"), "-reset_optim", "all"]
    distil = [
        *start,
        "-quantized_distill",
        "-teacher_model",
        str(folder / "teacher.pt"),
        "-quant_bits",
        "4",
    ]
    variants = {
        "plain_fp32_step": start,
        "quantized_distillation_step": distil,
        f"quantized_distillation_top{top_k}_cached_step": [*distil, "-distill_topk", str(top_k)],
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = {}
        for side in ("src", "tgt"):
            lines = Path(config["data"]["corpus_1"][f"path_{side}"]).read_text().splitlines()
            corpus[f"path_{side}"] = f"{tmp}/train.{side}"
            atomic_write_text(corpus[f"path_{side}"], "\n".join(lines[:pairs]) + "\n")
        data = {**config["data"], "corpus_1": corpus}
        for name in variants:
            atomic_write_text(
                f"{tmp}/{name}.yaml",
                yaml.safe_dump(
                    {
                        **config,
                        "data": data,
                        "save_model": f"{tmp}/{name}",
                        "train_steps": steps,
                        "report_every": 10,
                        "save_checkpoint_steps": 10 * steps,
                        "valid_steps": 10 * steps,
                    }
                ),
            )
        for _ in range(repeats):
            for name, args in variants.items():
                done = subprocess.run(
                    [bin_dir / "onmt_train", "-config", f"{tmp}/{name}.yaml", *args],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if done.returncode:
                    raise RuntimeError(f"onmt_train failed:\n{done.stderr[-2000:]}")
                samples[name].append(_seconds_per_step(done.stderr + done.stdout, steps // 2))
                print(f"    {name}: {samples[name][-1]:.3f} s/step", flush=True)
    rows = {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "repeats": len(s),
        }
        for name, s in samples.items()
    }
    plain = rows["plain_fp32_step"]
    return {
        "setup": f"onmt_train, {config['layers']}-layer LSTM student ({config['hidden_size']} "
        f"units) from {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}, "
        f"first {pairs:,} training pairs, {config['batch_size']} tokens a batch, steps "
        f"{steps // 2}-{steps} timed, {threads} threads",
        **rows,
        "ratio": ratio(rows["quantized_distillation_step"], plain),
        "top_k": top_k,
        "ratio_top_k_cached": ratio(rows[f"quantized_distillation_top{top_k}_cached_step"], plain),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onmt-steps", type=int, default=120)
    parser.add_argument("--onmt-pairs", type=int, default=2000, help="training pairs used")
    parser.add_argument("--top-k", type=int, default=8, help="K of the -distill_topk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=("vision", "translation"),
        help="measure one part again, keep the other's figures",
    )
    parser.add_argument(
        "--translation-dir",
        help="a multi30k recipe work folder (default: the recipe's, else make demo's)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"config": vars(args), "goal": "at most 1.3x"}
    if args.only == "translation":
        result["vision"] = load_result("training_cost")["vision"]
    else:
        result["vision"] = vision(args.scale, max(args.repeats, 9))
        print(f"training cost, vision: {result['vision']['ratio']['median']:.2f}x", flush=True)
    if args.only == "vision":
        result["translation"] = load_result("training_cost")["translation"]
        write_result("training_cost", result)
        return result
    candidates = [Path(args.translation_dir)] if args.translation_dir else TRANSLATION_DIRS
    folder = next((f for f in candidates if (f / "student_qd4.yaml").exists()), None)
    if folder is None:
        kept = kept_figures("training_cost", ("translation",))
        result.update(kept)  # a fresh clone: keep the committed figures rather than drop them
        print(
            "training cost: no multi30k recipe or demo run yet; translation "
            + ("figures kept from the last run" if kept else "skipped")
        )
    else:
        result["translation"] = translation(
            folder, args.onmt_steps, args.repeats, args.threads, args.onmt_pairs, args.top_k
        )
        print(f"training cost, translation: {result['translation']['ratio']['median']:.2f}x")
    write_result("training_cost", result)
    return result


if __name__ == "__main__":
    main()
