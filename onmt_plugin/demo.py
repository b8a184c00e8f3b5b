"""`make demo`: compress an existing, trained OpenNMT-py translator end to end (Multi30k,
German to English).

The teacher is the translator that ships with the project (``onmt_plugin/pretrained``: a
2-layer LSTM trained by ``python -m recipes.pretrained``, 39.65 BLEU with beam 5 on
test_2016_flickr), written out as the ordinary ``teacher.pt`` a user would bring. The demo
shrinks it to a 1-layer student, trains that student at 4 bits with the stock ``onmt_train
--quantized_distill`` on the int4 kernel's grid, builds the post-training quantized (PM)
baseline, packs both, and scores everything with ``qdistill onmt-eval`` on the whole
test_2016_flickr (1,000 sentences): BLEU, chrF, perplexity, real bytes, tokens/s on the int4
kernel and on the fp32 path, peak memory. Every stage is skipped when its output exists and
training continues from its last checkpoint, so an interrupted demo resumes.

    python -m onmt_plugin.demo --output-dir demo_out/multi30k
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

from onmt_plugin import pretrained
from recipes.translation import Corpus, TranslationScale, run

SAMPLE = Path(__file__).resolve().parent / "demo_data" / "multi30k"
SAMPLE_SIZES = {"train": 12000, "val": 200, "test": 1000}
SOURCE_STEMS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
# The shipped teacher's sizes; students train on the int4 kernel grid in groups of 128 (the
# encoder's bidirectional LSTMs are 128 wide per direction, so every matrix fits the kernel).
DEMO_SCALE = TranslationScale(
    name="demo",
    vocab_size=4000,
    hidden_size=256,
    teacher_steps=0,
    student_steps=900,
    bucket_size=128,
    quant_grid="int4_kernel",
    eval_beam=1,  # greedy only: the demo keeps to its time budget
)


def make_sample(source: Path) -> None:
    """Rebuild the bundled sample: the first lines of each Multi30k split in ``source``."""
    SAMPLE.mkdir(parents=True, exist_ok=True)
    for split, count in SAMPLE_SIZES.items():
        for lang in ("de", "en"):
            source_file = source / f"{SOURCE_STEMS[split]}.{lang}.gz"
            with gzip.open(source_file, "rt", encoding="utf-8") as handle:
                lines = [next(handle) for _ in range(count)]
            # mtime=0: the same sample gives the same bytes.
            with (
                open(SAMPLE / f"{split}.{lang}.gz", "wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out,
            ):
                out.write("".join(lines).encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_out/multi30k")
    parser.add_argument(
        "--data-path",
        default=str(SAMPLE),
        help="folder with train/val/test.{de,en}[.gz] (default: the bundled sample)",
    )
    parser.add_argument(
        "--teacher",
        default=str(pretrained.MULTI30K_DE_EN),
        help="shipped translator folder to compress (default: the Multi30k de-en LSTM)",
    )
    parser.add_argument("--threads", type=int, default=DEMO_SCALE.threads)
    parser.add_argument(
        "--student-steps",
        type=int,
        default=DEMO_SCALE.student_steps,
        help=f"training steps of the student (default {DEMO_SCALE.student_steps})",
    )
    parser.add_argument(
        "--make-sample", metavar="MULTI30K_DIR", help="rebuild the bundled sample and stop"
    )
    args = parser.parse_args(argv)
    if args.make_sample:
        make_sample(Path(args.make_sample))
        return 0
    start = time.time()
    corpus = Corpus(Path(args.data_path), "de", "en")
    scale = TranslationScale(
        **{**DEMO_SCALE.__dict__, "threads": args.threads, "student_steps": args.student_steps}
    )
    out = Path(args.output_dir)
    teacher = out / "teacher.pt"
    try:
        if not teacher.exists():
            print(f"the existing translator: {args.teacher} -> {teacher}", flush=True)
            pretrained.write_checkpoint(args.teacher, teacher)
        result = run(corpus, scale, out, teacher=teacher)
    except (FileNotFoundError, ValueError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    print()
    print((out / "report.md").read_text().split("\n\n")[2])
    card_path = Path(args.teacher) / pretrained.CARD
    about = pretrained.card(args.teacher)["description"] if card_path.is_file() else args.teacher
    print(
        f"\nwrote {out / 'report.md'} and {out / 'bleu_vs_size.png'} "
        f"({time.time() - start:.0f} s on {args.threads} CPU threads). Teacher: "
        f"{about}; student: {scale.student_steps} steps on "
        f"{result['counts']['train.src']:,} training pairs (a CPU-scale run, not paper scale)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
