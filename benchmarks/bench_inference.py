"""Inference speed of depth-reduced students against their teachers on this CPU, next to the
speed-up their depth predicts, and the load time of packed files against fp32 checkpoints.

- classification: one batch through the CIFAR-10 recipe's CNN teacher and student (their
  architectures at the chosen scale) and through torchvision's resnet34 and resnet18 (the
  `qdistill shrink vision` example); weights do not change the arithmetic, so they are
  initialised, not trained.
- translation: the stock ``onmt_translate -report_time`` on the Multi30k test set with the
  2-layer LSTM teacher and the 1-layer 4-bit student (packed) of the multi30k recipe, or of
  ``make demo`` when the recipe has not run; OpenNMT's own timer excludes start-up and loading.
- loading: the packed student against the same weights as an fp32 checkpoint, read into the
  checkpoint dict OpenNMT builds its model from.

Every timing is the median of repeats interleaved model by model, with the min-max spread, and
ratios are taken within this run.

    python -m benchmarks.bench_inference [--repeats 5] [--translation-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import kept_figures, ratio, timings, write_result
from recipes import small_runs as runs
from recipes.experiments import load_recipe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRANSLATION_DIRS = (HERE / "work" / "recipes" / "multi30k" / "work", ROOT / "demo_out" / "multi30k")


def _flops(model: nn.Module, batch: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(batch)
    return counter.get_total_flops()


def _weighted_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def classification_pair(
    name: str, teacher: nn.Module, student: nn.Module, batch: torch.Tensor, repeats: int
) -> dict:
    """Batch latency and throughput of both models, with depth and FLOP ratios."""
    teacher.eval(), student.eval()

    def forward(model: nn.Module):
        def run() -> None:
            with torch.inference_mode():
                model(batch)

        return run

    teacher_t = timings(forward(teacher), repeats)
    student_t = timings(forward(student), repeats)
    depth = _weighted_layers(student) / _weighted_layers(teacher)
    result = {
        "name": name,
        "batch_shape": list(batch.shape),
        "teacher": {
            **teacher_t,
            "layers": _weighted_layers(teacher),
            "images_per_s": len(batch) / teacher_t["median_s"],
        },
        "student": {
            **student_t,
            "layers": _weighted_layers(student),
            "images_per_s": len(batch) / student_t["median_s"],
        },
        "student_over_teacher_time": ratio(student_t, teacher_t),
        "predicted_by_depth": depth,
        "predicted_by_flops": _flops(student, batch) / _flops(teacher, batch),
    }
    print(
        f"  {name}: student/teacher time {result['student_over_teacher_time']['median']:.2f} "
        f"(depth predicts {depth:.2f})",
        flush=True,
    )
    return result


def classification(scale: str, repeats: int) -> list[dict]:
    cfg = runs.SmallRunConfig(**load_recipe("cifar10").parameters(scale))
    torch.manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, 32, 32)
    cifar = classification_pair(
        f"CIFAR-10 CNN (width {cfg.teacher_width}, depth {cfg.teacher_depth} -> "
        f"{cfg.student_depth})",
        runs.tiny_cnn(cfg.teacher_width, cfg.teacher_depth),
        runs.tiny_cnn(cfg.student_width, cfg.student_depth),
        images,
        repeats,
    )
    resnet = classification_pair(
        "torchvision resnet34 -> resnet18 (224x224)",
        torchvision.models.resnet34(),
        torchvision.models.resnet18(),
        torch.randn(8, 3, 224, 224),
        repeats,
    )
    return [cifar, resnet]


_AVERAGE_MS = re.compile(r"Average translation time \(ms\): ([\d.]+)")
_TOKENS_PER_S = re.compile(r"Tokens per second: ([\d.]+)")


def translation_dir(given: str | None) -> Path | None:
    candidates = [Path(given)] if given else TRANSLATION_DIRS
    for folder in candidates:
        if (folder / "teacher.pt").exists() and (folder / "student_qd4.qd").exists():
            return folder
    return None


def translation(folder: Path, repeats: int, threads: int) -> dict:
    """``onmt_translate -report_time`` on the test set, teacher and student interleaved."""
    from onmt_plugin.evaluate import translate

    source = folder / "data" / "test.src"
    sentences = len(source.read_text(encoding="utf-8").splitlines())
    models = {"teacher": folder / "teacher.pt", "student_qd4": folder / "student_qd4.qd"}
    extra = [
        "-gpu",
        "-1",
        "-batch_size",
        "32",
        "-beam_size",
        "5",
        "-report_time",
        "-transforms",
        "sentencepiece",
        "-src_subword_model",
        str(folder / "spm.src.model"),
        "-tgt_subword_model",
        str(folder / "spm.tgt.model"),
    ]
    samples: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats + 1):  # the first round warms the file cache
            for name, path in models.items():
                _, log = translate(str(path), str(source), f"{tmp}/{name}.txt", None, extra)
                if repeat:
                    samples[name].append(float(_AVERAGE_MS.search(log).group(1)) / 1000 * sentences)
                    tokens[name].append(float(_TOKENS_PER_S.search(log).group(1)))
    rows = {}
    for name in models:
        series = samples[name]
        rows[name] = {
            "median_s": statistics.median(series),
            "min_s": min(series),
            "max_s": max(series),
            "repeats": repeats,
            "tokens_per_s": statistics.median(tokens[name]),
            "path": str(models[name]),
            "bytes": models[name].stat().st_size,
        }
    result = {
        "models_from": str(folder),
        "sentences": sentences,
        "settings": {"beam_size": 5, "batch_size": 32, "threads": threads},
        **rows,
        "student_over_teacher_time": ratio(rows["student_qd4"], rows["teacher"]),
        "predicted_by_depth": 0.5,  # 1 encoder + 1 decoder layer against 2 + 2
    }
    print(
        f"  translation: student/teacher time {result['student_over_teacher_time']['median']:.2f}"
        " (depth predicts 0.50)",
        flush=True,
    )
    return result


def loading(folder: Path, repeats: int) -> dict:
    """The packed student against the same weights unpacked into an fp32 checkpoint."""
    from compressor.cli import main as qdistill
    from compressor.format.files import load_checkpoint
    from onmt_plugin import packing

    packed = folder / "student_qd4.qd"
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "student_qd4.pt"
        qdistill(["unpack", str(packed), "-o", str(fp32)])
        packed_t = timings(lambda: packing.load(packed), repeats)
        fp32_t = timings(lambda: load_checkpoint(fp32), repeats)
        fp32_bytes = fp32.stat().st_size
    return {
        "packed": {**packed_t, "bytes": packed.stat().st_size},
        "fp32_checkpoint": {**fp32_t, "bytes": fp32_bytes},
        "packed_over_fp32_time": ratio(packed_t, fp32_t),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch and onmt_translate threads")
    parser.add_argument(
        "--translation-dir",
        help="folder with teacher.pt, student_qd4.qd, "
        "data/test.src and spm.*.model (default: the multi30k recipe's, "
        "else make demo's)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the onmt_translate processes
    print("inference: classification", flush=True)
    result: dict = {"config": vars(args)}
    result["classification"] = classification(args.scale, args.repeats)
    folder = translation_dir(args.translation_dir)
    if folder is None:
        kept = kept_figures("inference", ("translation", "loading"))
        result.update(kept)  # a fresh clone: keep the committed figures rather than drop them
        print(
            "inference: no trained translation models yet (run the multi30k recipe or "
            "make demo); translation " + ("figures kept from the last run" if kept else "skipped"),
            flush=True,
        )
    else:
        print(f"inference: translation with the models in {folder}", flush=True)
        result["translation"] = translation(folder, args.repeats, args.threads)
        result["loading"] = loading(folder, max(args.repeats, 7))
    write_result("inference", result)
    return result


if __name__ == "__main__":
    main()
