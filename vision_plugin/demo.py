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
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)
    text = (
        "# qdistill demo: compressing a CIFAR-10 classifier\n\n"
        "Scale: the 1,000-image training and 300-image test sample bundled in "
        "`vision_plugin/demo_data`, a few epochs on a CPU. Accuracies at this scale are low and "
        "noisy (30 test images per class); the file sizes are the real bytes of each file.\n\n"
        f"{table}\n\n![accuracy against bytes](accuracy_vs_bytes.png)\n"
    )
    (out / "REPORT.md").write_text(text)
    return table


def make_sample(root: Path) -> None:
    """Rebuild the bundled sample from the full CIFAR-10 copy in ``root``."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", 1000), ("test", 300)):
        with np.load(root / f"{split}.npz") as npz:
            labels = npz["labels"]
            chosen = np.sort(rng.permutation(len(labels))[:count])
            np.savez_compressed(
                SAMPLE / f"{split}.npz", images=npz["images"][chosen], labels=labels[chosen]
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_out")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--make-sample", metavar="CIFAR10_DIR", help="rebuild the bundled sample")
    args = parser.parse_args(argv)
    if args.make_sample:
        make_sample(Path(args.make_sample))
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data-path", str(SAMPLE), "-b", "32", "--lr", "0.05", "--quiet"]
    rows = []
    start = time.time()
    for number, (name, label, extra) in enumerate(stages(out, args.epochs), 1):
        summary_path = out / name / "summary.json"
        if summary_path.exists():
            print(f"[{number}/7] {label}: done already ({summary_path})")
        else:
            print(f"[{number}/7] {label} ...", flush=True)
            code = run([*common, *extra, "--output-dir", str(out / name)])
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
