"""Multi30k de-en reproduction table at CPU scale: BLEU, chrF, perplexity and real bytes.

Runs the ``multi30k`` recipe (the stock OpenNMT-py tools with the plugin: a 2-layer LSTM
teacher, 1-layer students by quantized distillation and differentiable quantization, a
full-precision student, PM teachers) in ``benchmarks/work/recipes/multi30k``, where every
trained model and the evaluation are cached, so a stopped run resumes; then copies the result
to ``benchmarks/results/translation.json``, which later runs reuse while the recipe's
parameters stay the same.

    python -m benchmarks.bench_translation [--scale cpu] [--rerun]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from benchmarks.common import RESULTS, load_result
from recipes.experiments import load_recipe, run_recipe

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "recipes" / "multi30k"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--rerun", action="store_true", help="ignore the cached result")
    args = parser.parse_args(argv)
    recipe = load_recipe("multi30k")
    cached = load_result("translation")
    if (
        not args.rerun
        and cached is not None
        and cached["scale"] == args.scale
        and {k: v for k, v in cached["parameters"].items() if k != "name"}
        == recipe.parameters(args.scale)
    ):
        print(f"multi30k {args.scale}: cached in {RESULTS / 'translation.json'}", flush=True)
        return cached
    result = run_recipe(recipe, args.scale, WORK)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / ".translation.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS / "translation.json")
    shutil.copyfile(WORK / "work" / "bleu_vs_size.png", HERE / "multi30k_bleu_vs_size.png")
    return result


if __name__ == "__main__":
    main()
