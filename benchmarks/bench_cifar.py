"""CIFAR-10 reproduction table at CPU scale: accuracy against real packed-file bytes.

Runs the CIFAR-10 recipe (``recipes.cifar``): every configuration (teacher, full-precision
students, PM, quantized distillation, differentiable quantization with bit allocation, QKD) is
one cached result under ``benchmarks/results/cifar/``: a run that is stopped resumes where it
left off, and a finished configuration is skipped. Models are kept under ``benchmarks/work/``.

    python -m benchmarks.bench_cifar [--scale cpu] [--train-images N --steps N]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RESULTS, environment
from recipes import cifar
from recipes import small_runs as runs
from recipes.experiments import load_recipe

WORK = Path(__file__).resolve().parent / "work" / "cifar"
OUT = RESULTS / "cifar"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--train-images", type=int, help="override the recipe's value")
    parser.add_argument("--test-images", type=int, help="override the recipe's value")
    parser.add_argument("--steps", type=int, help="override the recipe's value")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The cifar10 recipe's parameters at this scale, so the report and the recipe agree.
    cfg = runs.SmallRunConfig(**load_recipe("cifar10").parameters(args.scale))
    overrides = {k: getattr(args, k) for k in ("train_images", "test_images", "steps", "seed")}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return cifar.run(cfg, OUT, WORK, environment=environment)


if __name__ == "__main__":
    main()
