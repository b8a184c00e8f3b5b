"""The checks behind the QKD ablation's verdict, run where QKD does not win.

- The activation quantizers' initialisation: for each quantized layer of the W{b}A{b} student
  (as the ablation builds it), the learned step set from the first batch, and on the next
  batch the share of inputs clipped at the top level and the share rounded to zero.
- QKD variants at one bit width and seed, each trained exactly like the ablation's QKD row but
  for one setting: ``teacher_lr_low`` (the teacher learns at a tenth of the row's rate in
  co-studying), ``phases_1_2_1`` (twice as much co-studying, half the tutoring).

That co-studying changes the teacher, and that tutoring uses the changed teacher, is asserted
by ``tests/core/training/test_qkd.py``; each QKD row records the teacher's accuracy before and
after co-studying. Results go to ``benchmarks/results/qkd_checks/``, one cached file a check.

    python -m benchmarks.qkd_checks [--bits 2] [--seed 0] [--variants NAME ...] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.bench_cifar import WORK
from benchmarks.common import RESULTS, environment, run_one_thread_workers
from compressor.format.files import atomic_write_json
from recipes import cifar
from recipes import small_runs as runs
from recipes.experiments import load_recipe

OUT = RESULTS / "qkd_checks"
# variant -> what it changes in runs.run_wa_quantization, given the recipe's parameters
VARIANTS = {
    "teacher_lr_low": lambda cfg: {"teacher_lr": cfg.lr / 100},
    "phases_1_2_1": lambda cfg: {"phases": (1, 2, 1)},
}


def activation_check(cfg: runs.SmallRunConfig, data: dict, work: Path, bits: int) -> dict:
    """Step, clipped share and zero share of each activation quantizer right after the
    ablation's initialisation, measured on the second batch of training images."""
    model = runs.wa_student(
        cifar.trained_model(cfg, data, work, "student_fp32"), bits, bits, data, cfg
    )
    seen = {}  # each layer's input before its quantizer (this hook runs first)
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, n=name: seen.__setitem__(n, args[0]), prepend=True
        )
        for name, module in model.named_modules()
        if hasattr(module, "input_quantizer")
    ]
    model.eval()
    with torch.no_grad():
        model(data["train_x"][cfg.batch_size : 2 * cfg.batch_size])
    for hook in hooks:
        hook.remove()
    layers = {}
    for name, x in seen.items():
        quantizer = dict(model.named_modules())[name].input_quantizer
        top = (2 ** (bits - 1) - 1) if bool(quantizer.signed) else 2**bits - 1
        step = float(quantizer.step.detach())
        layers[name] = {
            "step": step,
            "signed": bool(quantizer.signed),
            "clipped_share": float((x / step > top + 0.5).float().mean()),
            "zero_share": float(((x / step).round() == 0).float().mean()),
        }
    return {"bits": bits, "layers": layers}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2, choices=cifar.ABLATION_BITS)
    parser.add_argument("--seed", type=int, default=0, help="the ablation seed to vary")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=1, help="one-thread processes (default 1)")
    parser.add_argument("--steps", type=int, help="override the recipe's value (a quick try)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be 1 or more, got {args.workers}")
    cfg = runs.SmallRunConfig(**load_recipe("cifar10").parameters("cpu"))
    cfg = cfg if args.steps is None else replace(cfg, steps=args.steps)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.workers > 1 and len(args.variants) > 1:
        common = ["--bits", str(args.bits), "--seed", str(args.seed)]
        common += [] if args.steps is None else ["--steps", str(args.steps)]
        shares = [args.variants[i :: args.workers] for i in range(args.workers)]
        argv_lists = [[*common, "--variants", *share] for share in shares if share]
        if run_one_thread_workers("benchmarks.qkd_checks", argv_lists):
            raise SystemExit("qkd_checks: a worker failed; run again to resume")
    data = runs.load_cifar10(runs.data_root(), cfg.train_images, cfg.test_images, cfg.seed)
    results = {"activations": activation_check(cfg, data, WORK, args.bits)}
    atomic_write_json(OUT / f"activations_w{args.bits}a{args.bits}.json", results["activations"])
    for variant in args.variants:
        # a quick try with --steps never replaces a full-size result
        steps = "" if args.steps is None else f"_steps{args.steps}"
        path = OUT / f"qkd_w{args.bits}a{args.bits}_seed{args.seed}_{variant}{steps}.json"
        cached = json.loads(path.read_text()) if path.exists() else None
        if cached is not None and cached["config"] == asdict(cfg):
            results[variant] = cached
            print(f"  {variant:<16} cached: {cached['accuracy']:.2f}%", flush=True)
            continue
        changed = VARIANTS[variant](cfg)
        teacher = cifar.trained_model(cfg, data, WORK, "teacher")
        start = cifar.trained_model(cfg, data, WORK, "student_fp32")
        began = time.perf_counter()
        model, info = runs.run_wa_quantization(
            data,
            replace(cfg, seed=cfg.seed + args.seed),
            teacher,
            start,
            args.bits,
            "qkd",
            **changed,
        )
        info.pop("history")
        results[variant] = {
            "variant": variant,
            "bits": args.bits,
            "seed": args.seed,
            "changed": {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()},
            "accuracy": runs.accuracy(model, data),
            "train_s": time.perf_counter() - began,
            "config": asdict(cfg),
            "environment": environment(),
            **info,
        }
        atomic_write_json(path, results[variant])
        print(f"  {variant:<16} {results[variant]['accuracy']:.2f}%", flush=True)
    return results


if __name__ == "__main__":
    main()
