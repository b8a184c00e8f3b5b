"""Multi30k de-en reproduction table at CPU scale: BLEU, chrF, perplexity and real bytes.

Runs the ``multi30k`` recipe (the stock OpenNMT-py tools with the plugin: a 2-layer LSTM
teacher, 1-layer students by quantized distillation and differentiable quantization, a
full-precision student, PM teachers) in ``benchmarks/work/recipes/multi30k``, where every
trained model and the evaluation are cached, so a stopped run resumes; then copies the result
to ``benchmarks/results/translation.json``.

    python -m benchmarks.bench_translation [--scale cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from benchmarks.common import RESULTS
from recipes.experiments import load_recipe, run_recipe

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "recipes" / "multi30k"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    args = parser.parse_args(argv)
    result = run_recipe(load_recipe("multi30k"), args.scale, WORK)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / ".translation.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS / "translation.json")
    shutil.copyfile(WORK / "work" / "bleu_vs_size.png", HERE / "multi30k_bleu_vs_size.png")
    return result


if __name__ == "__main__":
    main()
