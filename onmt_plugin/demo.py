"""`make demo`: compress an OpenNMT-py translator end to end on the Multi30k sample bundled
with the project (German to English).

Trains a 2-layer LSTM teacher with the stock ``onmt_train``, makes a 1-layer 4-bit student by
quantized distillation (``onmt_train --quantized_distill``, started from the teacher's first
layers), builds the post-training quantized (PM) teacher, packs both low-bit models and scores
all three with ``qdistill onmt-eval``: BLEU, chrF, perplexity, real file bytes, speed. Every
stage is skipped when its output exists and training continues from its last checkpoint, so an
interrupted demo resumes. It runs at a small scale so that it finishes in about ten minutes on
two CPU cores: the BLEU scores are far below published Multi30k results; the bytes are real.

    python -m onmt_plugin.demo --output-dir demo_out/multi30k
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

from recipes.translation import Corpus, TranslationScale, run

SAMPLE = Path(__file__).resolve().parent / "demo_data" / "multi30k"
SAMPLE_SIZES = {"train": 12000, "val": 200, "test": 500}
SOURCE_STEMS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
DEMO_SCALE = TranslationScale(name="demo", teacher_steps=1000, student_steps=300)


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
    parser.add_argument("--threads", type=int, default=DEMO_SCALE.threads)
    parser.add_argument(
        "--make-sample", metavar="MULTI30K_DIR", help="rebuild the bundled sample and stop"
    )
    args = parser.parse_args(argv)
    if args.make_sample:
        make_sample(Path(args.make_sample))
        return 0
    start = time.time()
    corpus = Corpus(Path(args.data_path), "de", "en")
    scale = TranslationScale(**{**DEMO_SCALE.__dict__, "threads": args.threads})
    try:
        result = run(corpus, scale, args.output_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output_dir)
    print()
    print((out / "report.md").read_text().split("\n\n")[2])
    print(
        f"\nwrote {out / 'report.md'} and {out / 'bleu_vs_size.png'} "
        f"({time.time() - start:.0f} s; scale: {result['counts']['train.src']:,} training pairs, "
        f"{scale.teacher_steps}+{scale.student_steps} steps on CPU, not paper scale)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
