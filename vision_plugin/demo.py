"""`make demo`: compress a CIFAR-10 classifier end to end on the sample bundled with the project.

Trains a ResNet-18 teacher, distils it into 4-bit and 2-bit ShuffleNet-v2 (x0.5) students
by quantized distillation, builds the post-training (PM) baselines, and reports accuracy
against the real size in bytes of every file. Each stage is skipped when its output exists,
so an interrupted demo resumes. It runs at toy scale (1,000 training images, a few epochs) so
that it finishes in minutes on two CPU cores: the accuracies are low, the file sizes are real.

    python -m vision_plugin.demo --output-dir demo_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compressor.format.files import atomic_write, atomic_write_text
from vision_plugin.train import run

SAMPLE = Path(__file__).resolve().parent / "demo_data"
TEACHER = ["--model", "resnet18", "--cifar-stem"]
STUDENT = ["--model", "shufflenet_v2_x0_5", "--cifar-stem"]


def stages(out: Path, epochs: int) -> list[tuple[str, str, list[str]]]:
    teacher_ckpt = str(out / "teacher" / "checkpoint.pth")
    student_ckpt = str(out / "student_fp32_distilled" / "checkpoint.pth")
    distil = ["--teacher", "resnet18", "--teacher-checkpoint", teacher_ckpt]
    train = ["--epochs", str(epochs)]
    fp32 = ["--full-precision", *train]
    post = ["--student-checkpoint", student_ckpt, "--post-training-only"]
    return [
        ("teacher", "ResNet-18 teacher, fp32", [*TEACHER, *fp32]),
        ("student_fp32", "ShuffleNet student, fp32, labels only", [*STUDENT, *fp32]),
        (
            "student_fp32_distilled",
            "ShuffleNet student, fp32, distilled",
            [*STUDENT, *distil, *fp32],
        ),
        (
            "qd_4bit",
            "quantized distillation, 4-bit",
            [*STUDENT, *distil, "--quant-bits", "4", *train],
        ),
        (
            "qd_2bit",
            "quantized distillation, 2-bit",
            [*STUDENT, *distil, "--quant-bits", "2", *train],
        ),
        (
            "pm_4bit",
            "post-training (PM) 4-bit of the distilled student",
            [*STUDENT, *post, "--quant-bits", "4"],
        ),
        (
            "pm_2bit",
            "post-training (PM) 2-bit of the distilled student",
            [*STUDENT, *post, "--quant-bits", "2"],
        ),
    ]


def file_bytes(summary: dict) -> int:
    return summary.get("packed_bytes") or summary["student_fp32_bytes"]


def report(out: Path, rows: list[tuple[str, str, dict]]) -> str:
    teacher_bytes = file_bytes(rows[0][2])
    lines = [
        "| model | Acc@1 % | file | bytes | smaller than the teacher |",
        "|---|---|---|---|---|",
    ]
    for _name, label, s in rows:
        kind = "packed .qd" if "packed_bytes" in s else "fp32 safetensors"
        lines.append(
            f"| {label} | {s['acc1']:.1f} | {kind} | {file_bytes(s):,} | "
            f"{teacher_bytes / file_bytes(s):.1f}x |"
        )
    table = "\n".join(lines)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, _, s in rows:
        ax.scatter(file_bytes(s), s["acc1"], marker="*" if name == "teacher" else "o", s=60)
        ax.annotate(
            name, (file_bytes(s), s["acc1"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("file size in bytes (log scale)")
    ax.set_ylabel("CIFAR-10 sample accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(out / "accuracy_vs_bytes.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    text = (
        "# qdistill demo: compressing a CIFAR-10 classifier\n\n"
        "Scale: the 1,000-image training and 300-image test sample bundled in "
        "`vision_plugin/demo_data`, a few epochs on a CPU. Accuracies at this scale are low and "
        "noisy (30 test images per class); the file sizes are the real bytes of each file.\n\n"
        f"{table}\n\n![accuracy against bytes](accuracy_vs_bytes.png)\n"
    )
    atomic_write_text(out / "REPORT.md", text)
    return table


def make_sample(root: Path) -> None:
    """Rebuild the bundled sample from the full CIFAR-10 copy in ``root``."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", 1000), ("test", 300)):
        with np.load(root / f"{split}.npz") as npz:
            labels = npz["labels"]
            chosen = np.sort(rng.permutation(len(labels))[:count])
            with atomic_write(SAMPLE / f"{split}.npz", "wb") as handle:
                np.savez_compressed(handle, images=npz["images"][chosen], labels=labels[chosen])


def _error(message: str) -> int:
    print(f"vision_plugin.demo: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_out")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--make-sample", metavar="CIFAR10_DIR", help="rebuild the bundled sample")
    args = parser.parse_args(argv)
    if args.make_sample:
        source = Path(args.make_sample)
        missing = [n for n in ("train.npz", "test.npz") if not (source / n).is_file()]
        if missing:
            return _error(f"--make-sample {source} lacks {' and '.join(missing)} (CIFAR-10 npz)")
        make_sample(source)
        return 0
    out = Path(args.output_dir)
    if args.epochs < 1:
        return _error(f"--epochs must be 1 or more, got {args.epochs}")
    if out.exists() and not out.is_dir():
        return _error(f"--output-dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _error(f"cannot create --output-dir {out}: {exc.strerror}")
    common = ["--data-path", str(SAMPLE), "-b", "32", "--lr", "0.05", "--quiet"]
    rows = []
    start = time.time()
    for number, (name, label, extra) in enumerate(stages(out, args.epochs), 1):
        summary_path = out / name / "summary.json"
        if summary_path.exists():
            print(f"[{number}/7] {label}: done already ({summary_path})")
        else:
            print(f"[{number}/7] {label} ...", flush=True)
            # The stage folders are the demo's own: an interrupted stage resumes from its last
            # checkpoint, or starts again over the files of its unfinished run.
            resume = out / name / "checkpoint.pth"
            again = ["--resume", str(resume)] if resume.is_file() else []
            code = run([*common, *extra, *again, "--force", "--output-dir", str(out / name)])
            if code:
                return code
        rows.append((name, label, json.loads(summary_path.read_text())))
    table = report(out, rows)
    print(
        f"\n{table}\n\nwrote {out / 'REPORT.md'} and {out / 'accuracy_vs_bytes.png'} "
        f"({time.time() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
