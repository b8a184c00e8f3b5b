"""CIFAR-10 reproduction table at CPU scale: accuracy against real packed-file bytes.

Runs the CIFAR-10 recipe (``recipes.cifar``): every configuration (teacher, full-precision
students, PM, quantized distillation, differentiable quantization with bit allocation, the QKD
ablation) is one cached result under ``benchmarks/results/cifar/``: a run that is stopped
resumes where it left off, and a finished configuration is skipped. Models are kept under
``benchmarks/work/``. ``--only qkd-ablation`` runs the teacher, the fp32 student and the
ablation's rows alone. ``--workers N`` trains the models the configurations share first, then
runs the configurations in N processes of one thread each (on a small CNN, two one-thread
processes do about twice the work of one two-thread process).

    python -m benchmarks.bench_cifar [--scale cpu] [--only NAME ...] [--workers N]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RESULTS, environment, run_one_thread_workers
from recipes import cifar
from recipes import small_runs as runs
from recipes.experiments import load_recipe

WORK = Path(__file__).resolve().parent / "work" / "cifar"
OUT = RESULTS / "cifar"


def _queues(names: list[str], workers: int) -> list[list[str]]:
    """``names`` shared out among ``workers`` queues of about equal cost, longest first (a QKD
    row costs about 1.6 of the others: its teacher trains in co-studying and runs in tutoring)."""
    cost = {n: 1.6 if n.startswith("qkd_") else 1.0 for n in names}
    queues: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(names, key=lambda n: -cost[n]):
        min(queues, key=lambda q: sum(cost[n] for n in q)).append(name)
    return [q for q in queues if q]


def _run_in_workers(
    cfg: runs.SmallRunConfig, names: list[str], args: argparse.Namespace, out: Path, work: Path
) -> None:
    """Train the shared models here, then the configurations left to do in worker processes."""
    todo = [n for n in names if cifar.cached_result(cfg, out, n) is None]
    if not todo:
        return
    data = runs.load_cifar10(
        runs.data_root(), cfg.train_images, cfg.test_images, cfg.seed, cfg.device
    )
    for model in dict.fromkeys(m for n in todo for m in cifar.starts_from(n)):
        cifar.trained_model(cfg, data, work, model)
    forwarded = ["--scale", args.scale, "--seed", str(args.seed)]
    for flag in ("train_images", "test_images", "steps", "output_dir"):
        if getattr(args, flag) is not None:
            forwarded += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    queues = _queues(todo, args.workers)
    failed = run_one_thread_workers(
        "benchmarks.bench_cifar", [[*forwarded, "--only", *queue] for queue in queues]
    )
    if failed:
        raise SystemExit(f"bench_cifar: a worker failed on {failed}; run again to resume")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--train-images", type=int, help="override the recipe's value")
    parser.add_argument("--test-images", type=int, help="override the recipe's value")
    parser.add_argument("--steps", type=int, help="override the recipe's value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="these configurations alone (qkd-ablation: the QKD ablation with its references)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes of one thread each that share the configurations out (default: 1)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="results in OUTPUT_DIR/cifar, models in OUTPUT_DIR/work "
        "(default: benchmarks/results/cifar and benchmarks/work/cifar)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be 1 or more, got {args.workers}")
    out, work = (
        (OUT, WORK)
        if args.output_dir is None
        else (args.output_dir / "cifar", args.output_dir / "work")
    )
    names = cifar.CONFIGURATIONS
    if args.only:
        named = {"qkd-ablation": ("teacher", "student_fp32", *cifar.QKD_ABLATION)}
        names = tuple(n for name in args.only for n in named.get(name, (name,)))
        unknown = sorted(set(names) - set(cifar.CONFIGURATIONS))
        if unknown:
            parser.error(
                f"unknown configurations {unknown}; choose from {list(named)} or "
                f"{list(cifar.CONFIGURATIONS)}"
            )
    # The cifar10 recipe's parameters at this scale, so the report and the recipe agree.
    cfg = runs.SmallRunConfig(**load_recipe("cifar10").parameters(args.scale))
    overrides = {k: getattr(args, k) for k in ("train_images", "test_images", "steps", "seed")}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.workers > 1:
        _run_in_workers(cfg, list(names), args, out, work)
    return cifar.run(cfg, out, work, names, environment=environment)


if __name__ == "__main__":
    main()
