"""CIFAR-10 reproduction table at CPU scale: accuracy against real packed-file bytes.

Every configuration (teacher, full-precision students, PM, quantized distillation,
differentiable quantization with bit allocation, QKD) is one cached result under
``benchmarks/results/cifar/``: a run that is stopped resumes where it left off, and a finished
configuration is skipped. Models trained on the way are kept under ``benchmarks/work/``.

    python -m benchmarks.bench_cifar [--train-images 20000 --steps 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import compressor
from benchmarks.common import RESULTS, environment, timings
from compressor.training import DistillConfig, distill_step
from recipes import small_runs as runs

WORK = Path(__file__).resolve().parent / "work" / "cifar"
OUT = RESULTS / "cifar"


def _fp32_bytes(model: nn.Module, path: Path) -> int:
    state = (
        compressor.shadow_state_dict(model)
        if list(compressor.quantized_tensors(model))
        else model.state_dict()
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.stat().st_size


def _save_model(model: nn.Module, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def _cached_model(name: str, build, make) -> nn.Module:  # noqa: ANN001
    """Train once, then reload: the teacher and fp32 students are reused across methods."""
    path = WORK / f"{name}.pt"
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    model = make()
    _save_model(model, path)
    return model


def _record(name: str, cfg, method: str, bits, model: nn.Module, data, extra=None) -> dict:  # noqa: ANN001
    packed = WORK / f"{name}.qd"
    quantized = bool(compressor.quantization_specs(model))
    packed_bytes = compressor.save_packed(model, packed) if quantized else None
    result = {
        "name": name,
        "method": method,
        "bits": bits,
        "accuracy": runs.accuracy(model, data),
        "packed_bytes": packed_bytes,
        "fp32_bytes": _fp32_bytes(model, WORK / f"{name}.fp32.safetensors"),
        "config": asdict(cfg),
        **(extra or {}),
        "environment": environment(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, OUT / f"{name}.json")
    return result


def _done(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def training_cost(cfg, data, teacher: nn.Module, repeats: int = 7) -> dict:  # noqa: ANN001
    """One quantized-distillation step of the student against one plain fp32 step of the same
    student without a teacher, on the same batch, timed in the same run."""
    inputs, target = next(runs.batches(data, cfg.batch_size, cfg.seed))
    plain = runs.student(cfg)
    quantized = runs.student(cfg)
    compressor.quantize_(quantized, compressor.QuantConfig(bits=4))
    config = DistillConfig(cfg.temperature, cfg.alpha)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3)
    quant_opt = torch.optim.SGD(quantized.parameters(), lr=1e-3)
    base = timings(lambda: distill_step(plain, None, inputs, target, plain_opt, config), repeats)
    distil = timings(
        lambda: distill_step(quantized, teacher, inputs, target, quant_opt, config), repeats
    )
    return {
        "plain_fp32_step": base,
        "quantized_distillation_step": distil,
        "ratio": distil["median_s"] / base["median_s"],
        "goal": "at most 1.3x",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = replace(
        runs.SmallRunConfig(),
        train_images=args.train_images,
        test_images=args.test_images,
        steps=args.steps,
        seed=args.seed,
    )
    WORK.mkdir(parents=True, exist_ok=True)
    data = runs.load_cifar10(runs.data_root(), cfg.train_images, cfg.test_images, cfg.seed)
    teacher = _cached_model(
        "teacher",
        lambda: runs.tiny_cnn(cfg.teacher_width, 3),
        lambda: runs.train_teacher(data, cfg),
    )
    plain = _cached_model(
        "student_fp32", lambda: runs.student(cfg), lambda: runs.run_fp32_student(data, cfg, None)
    )
    distilled = _cached_model(
        "student_fp32_distilled",
        lambda: runs.student(cfg),
        lambda: runs.run_fp32_student(data, cfg, teacher),
    )
    jobs = [
        ("teacher", "teacher fp32", None, lambda: teacher),
        ("student_fp32", "student fp32", None, lambda: plain),
        ("student_fp32_distilled", "student fp32 distilled", None, lambda: distilled),
    ]
    for bits in (2, 4, 8):
        jobs.append((f"pm_{bits}", "PM", bits, lambda b=bits: runs.run_post_training(distilled, b)))
        jobs.append(
            (
                f"qd_{bits}",
                "quantized distillation",
                bits,
                lambda b=bits: runs.run_quantized_distillation(data, cfg, teacher, b)[0],
            )
        )
    for bits in (2, 4):
        jobs.append(
            (
                f"dq_{bits}",
                "differentiable quantization + bit allocation",
                bits,
                lambda b=bits: runs.run_differentiable_quantization(
                    data, cfg, teacher, distilled, b
                )[0],
            )
        )
    jobs.append(
        ("qkd_w4a4", "QKD W4A4", 4, lambda: runs.run_qkd(data, cfg, teacher, init=distilled)[0])
    )

    results = []
    for name, method, bits, make in jobs:
        cached = _done(name)
        if cached is not None and cached["config"] == asdict(cfg):
            print(f"{name:<28} cached: {cached['accuracy']:.2f}%")
            results.append(cached)
            continue
        start = time.perf_counter()
        model = make()
        result = _record(
            name, cfg, method, bits, model, data, {"train_s": time.perf_counter() - start}
        )
        print(f"{name:<28} {result['accuracy']:.2f}%  packed {result['packed_bytes']}")
        results.append(result)
    cost = training_cost(cfg, data, teacher)
    (OUT / "training_cost.json").write_text(
        json.dumps({**cost, "environment": environment()}, indent=2)
    )
    print(f"training cost: quantized distillation step / plain fp32 step = {cost['ratio']:.2f}")
    return results


if __name__ == "__main__":
    main()
