"""`make demo-vision`: compress the CIFAR-10 classifier that ships with qdistill.

The teacher is the shipped ShuffleNet-v2 x1.0 (``vision_plugin/pretrained/``), written out as
the checkpoint a user would have. The demo evaluates it, builds the post-training (PM) 4-bit
and 2-bit baselines of it, and trains 4-bit and 2-bit students of the same architecture by
quantized distillation, started from the teacher's weights. It reports accuracy against the
real size in bytes of every file. Each stage is skipped when its output exists, so an
interrupted demo resumes. It runs at demo scale so that it finishes in minutes on two CPU
cores: the students train on the 1,000-image sample bundled in ``vision_plugin/demo_data`` for
a few epochs, and every model is tested on its 2,000-image test sample.

    python -m vision_plugin.demo --output-dir demo_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compressor.format.files import (
    CheckpointError,
    OutputError,
    atomic_write,
    atomic_write_text,
    written_by,
)
from vision_plugin import pretrained
from vision_plugin.train import run

SAMPLE = Path(__file__).resolve().parent / "demo_data"
SHIPPED = pretrained.CIFAR10_SHUFFLENET
ARCH = "shufflenet_v2_x1_0"
EPOCHS = {4: 4, 2: 8}  # per bit width: 2 bits needs longer to recover from the teacher
BATCH = 64
SAMPLE_TRAIN, SAMPLE_TEST = 1000, 2000  # images in the bundled sample
LR = 0.01  # fine-tuning from trained weights: a tenth of the teacher's starting rate


def stages(out: Path, epochs: dict[int, int]) -> list[tuple[str, str, list[str]]]:
    """(folder, label, vision_plugin.train arguments) of every stage, in the report's order;
    ``epochs`` maps bits to the epochs of that quantized-distillation student."""
    teacher = str(out / "teacher.pth")
    model = ["--model", ARCH, "--cifar-stem", "--student-checkpoint", teacher]
    post = [*model, "--post-training-only"]
    distil = [*model, "--teacher", ARCH, "--teacher-checkpoint", teacher]
    rows = [("teacher", "shipped teacher, fp32", [*post, "--full-precision"])]
    for bits in (4, 2):
        rows += [
            (f"pm_{bits}bit", f"PM {bits}-bit of the teacher", [*post, "--quant-bits", str(bits)]),
            (
                f"qd_{bits}bit",
                f"quantized distillation, {bits}-bit",
                [*distil, "--quant-bits", str(bits), "--epochs", str(epochs[bits])],
            ),
        ]
    return rows


def file_bytes(summary: dict) -> int:
    return summary.get("packed_bytes") or summary["student_fp32_bytes"]


def _shipped() -> tuple[int, str]:
    """Bytes of the shipped fp16 file, and a line on where the teacher came from."""
    size = (SHIPPED / pretrained.WEIGHTS).stat().st_size
    card = pretrained.card(SHIPPED)
    line = (
        f"The teacher is the classifier that ships with qdistill ({card['model']} with the CIFAR "
        f"stem, `vision_plugin/pretrained/{SHIPPED.name}`): trained by our own recipe for "
        f"{card['epochs']} epochs on a 2-core CPU, "
        f"{card['test']['fp32']['acc1']:.2f}% Acc@1 on the full 10,000-image CIFAR-10 test set. "
        "It ships as fp16 safetensors of "
        f"{size:,} bytes; the demo rebuilds the fp32 checkpoint a user would have."
    )
    return size, line


def report(out: Path, rows: list[tuple[str, str, dict]], scale: str | None = None) -> str:
    """Write REPORT.md and accuracy_vs_bytes.png into ``out``; the table as text."""
    teacher = rows[0][2]
    teacher_bytes = file_bytes(teacher)
    shipped_bytes, origin = _shipped()
    lines = [
        "| model | Acc@1 % | vs teacher | file | bytes | smaller than fp32 | than shipped fp16 |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for _name, label, s in rows:
        kind = "packed .qd" if "packed_bytes" in s else "fp32 safetensors"
        size = file_bytes(s)
        lines.append(
            f"| {label} | {s['acc1']:.2f} | {s['acc1'] - teacher['acc1']:+.2f} | {kind} | "
            f"{size:,} | {teacher_bytes / size:.1f}x | {shipped_bytes / size:.1f}x |"
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
    ax.set_ylabel("Acc@1 on the CIFAR-10 test sample (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(out / "accuracy_vs_bytes.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    text = (
        "# qdistill demo: compressing a trained CIFAR-10 classifier\n\n"
        f"{origin}\n\n"
        f"Scale: {scale or 'demo scale'}. The accuracies are measured on the test sample, so "
        "they differ from the full-test-set figure above; the file sizes are the real bytes of "
        "each file.\n\n"
        f"{table}\n\n![accuracy against bytes](accuracy_vs_bytes.png)\n"
    )
    atomic_write_text(out / "REPORT.md", text)
    return table


def make_sample(root: Path) -> None:
    """Rebuild the bundled sample from the full CIFAR-10 copy in ``root``."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", SAMPLE_TRAIN), ("test", SAMPLE_TEST)):
        with np.load(root / f"{split}.npz") as npz:
            labels = npz["labels"]
            chosen = np.sort(rng.permutation(len(labels))[:count])
            with atomic_write(SAMPLE / f"{split}.npz", "wb") as handle:
                np.savez_compressed(handle, images=npz["images"][chosen], labels=labels[chosen])


def write_teacher(out: Path) -> Path:
    """The shipped classifier as the user's checkpoint ``teacher.pth`` (kept when the demo
    wrote it already; a file of anyone else there is refused, not replaced)."""
    path = out / "teacher.pth"
    if not (path.exists() or path.is_symlink()):
        return pretrained.write_checkpoint(SHIPPED, path)
    if path.is_file() and written_by(path) == pretrained.COMMAND:
        return path
    raise OutputError(
        f"{path} exists and is not the teacher this demo writes; move it or choose another "
        "--output-dir"
    )


def _error(message: str) -> int:
    print(f"vision_plugin.demo: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_out")
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"epochs of both QD students (default: {EPOCHS[4]} at 4 bits, {EPOCHS[2]} at 2)",
    )
    parser.add_argument("--make-sample", metavar="CIFAR10_DIR", help="rebuild the bundled sample")
    # For the tests: a smaller run on part of the sample.
    parser.add_argument("--max-train-samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-val-samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_sample:
        source = Path(args.make_sample)
        missing = [n for n in ("train.npz", "test.npz") if not (source / n).is_file()]
        if missing:
            return _error(f"--make-sample {source} lacks {' and '.join(missing)} (CIFAR-10 npz)")
        make_sample(source)
        return 0
    out = Path(args.output_dir)
    if args.epochs is not None and args.epochs < 1:
        return _error(f"--epochs must be 1 or more, got {args.epochs}")
    if out.exists() and not out.is_dir():
        return _error(f"--output-dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        teacher = write_teacher(out)
    except OSError as exc:
        return _error(f"cannot write in --output-dir {out}: {exc.strerror or exc}")
    except (CheckpointError, OutputError) as exc:
        return _error(str(exc))
    common = ["--data-path", str(SAMPLE), "-b", str(BATCH), "--lr", str(LR), "--quiet"]
    limits = {
        "--max-train-samples": args.max_train_samples,
        "--max-val-samples": args.max_val_samples,
    }
    for flag, value in limits.items():
        if value is not None:
            common += [flag, str(value)]
    train_images = min(args.max_train_samples or SAMPLE_TRAIN, SAMPLE_TRAIN)
    test_images = min(args.max_val_samples or SAMPLE_TEST, SAMPLE_TEST)
    epochs = {bits: args.epochs or count for bits, count in EPOCHS.items()}
    scale = (
        f"the quantized-distillation students trained {epochs[4]} (4-bit) and {epochs[2]} "
        f"(2-bit) epochs from the teacher's weights on {train_images:,} CIFAR-10 training "
        f"images (batch {BATCH}, lr {LR}, cosine schedule), every model tested on "
        f"{test_images:,} test images (one image is {100 / test_images:.2f} points), on a CPU"
    )
    print(f"teacher: {SHIPPED.name}, written as {teacher}")
    print(f"scale: {scale}", flush=True)
    plan = stages(out, epochs)
    rows = []
    start = time.time()
    for number, (name, label, extra) in enumerate(plan, 1):
        summary_path = out / name / "summary.json"
        if summary_path.exists():
            print(f"[{number}/{len(plan)}] {label}: done already ({summary_path})")
        else:
            print(f"[{number}/{len(plan)}] {label} ...", flush=True)
            began = time.time()
            # The stage folders are the demo's own: an interrupted stage resumes from its last
            # checkpoint, or starts again over the files of its unfinished run.
            resume = out / name / "checkpoint.pth"
            again = ["--resume", str(resume)] if resume.is_file() else []
            code = run([*common, *extra, *again, "--force", "--output-dir", str(out / name)])
            if code:
                return code
            print(f"[{number}/{len(plan)}] {label}: {time.time() - began:.0f} s", flush=True)
        rows.append((name, label, json.loads(summary_path.read_text())))
    table = report(out, rows, scale)
    print(
        f"\n{table}\n\nwrote {out / 'REPORT.md'} and {out / 'accuracy_vs_bytes.png'} "
        f"({time.time() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
