"""What ``-distill_topk`` costs in translation quality: the demo's setting (Multi30k sample,
2-layer LSTM teacher, 1-layer 4-bit students) with one student distilled from the full teacher
on every batch and one from its cached top-8 logits (the other classes merged), evaluated
together with ``qdistill onmt-eval``.

Reuses ``make demo``'s teacher when ``demo_out/multi30k`` holds one (a copy, so the demo's
folder is left as it is); otherwise trains everything at the demo's scale. Resumable like
every recipe run.

    python -m benchmarks.bench_topk [--top-k 8]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.common import write_result
from compressor.format.files import atomic_directory
from onmt_plugin.demo import DEMO_SCALE, SAMPLE
from recipes.translation import Corpus, run

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "topk_demo"
DEMO = HERE.parent / "demo_out" / "multi30k"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args(argv)
    if not WORK.exists() and (DEMO / "teacher.pt").exists():
        with atomic_directory(WORK) as staging:  # all of the demo's models, or none
            skip = shutil.ignore_patterns("eval.json", "report.*", "*.png")
            shutil.copytree(DEMO, staging, dirs_exist_ok=True, ignore=skip)
    scale = replace(DEMO_SCALE, top_k=(args.top_k,))
    result = run(Corpus(SAMPLE, "de", "en"), scale, WORK)
    rows = {row["name"]: row for row in result["rows"]}
    exact, cached = rows["student_qd4"], rows[f"student_qd4_top{args.top_k}"]
    summary = {
        "scale": asdict(scale),
        "counts": result["counts"],
        "rows": result["rows"],
        "bleu_cached_minus_exact": cached["bleu"] - exact["bleu"],
        "chrf_cached_minus_exact": cached["chrf"] - exact["chrf"],
        "ppl_word_cached_over_exact": cached["ppl_word"] / exact["ppl_word"],
    }
    write_result("topk", summary)
    print(
        f"top-{args.top_k} cached teacher: BLEU {cached['bleu']:.2f} against "
        f"{exact['bleu']:.2f} with the full teacher"
    )
    return summary


if __name__ == "__main__":
    main()
