"""Small, fast, deterministic runs of every method on real CIFAR-10 images.

A few thousand images, a tiny CNN teacher and a shallower, narrower student, a few hundred
steps: seconds to a minute each on a CPU. Tests drive them; benchmarks scale them up through
:class:`SmallRunConfig`.

    python -m recipes.small_runs --train-images 4000 --steps 300
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import compressor
from compressor.format.files import atomic_write_json
from compressor.training.bit_allocation import allocate_bits
from compressor.training.differentiable import differentiable_quantization
from compressor.training.qkd import QKDSchedule, qkd_train
from compressor.training.quantized_distillation import quantized_distillation
from compressor.training.step import DistillConfig

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def data_root() -> Path:
    return Path(os.environ.get("QDISTILL_DATA", DEFAULT_DATA))


@dataclass(frozen=True)
class SmallRunConfig:
    train_images: int = 4000
    test_images: int = 1000
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.05
    teacher_width: int = 32
    student_width: int = 16
    teacher_depth: int = 3
    student_depth: int = 2
    temperature: float = 2.0
    alpha: float = 0.7
    seed: int = 0
    device: str = "cpu"


def load_cifar10(
    root: Path, train_images: int, test_images: int, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """A fixed random subset of CIFAR-10's npz files (which are sorted by class), normalised,
    as NCHW float tensors."""
    out = {}
    for split, count in (("train", train_images), ("test", test_images)):
        path = root / "cifar10" / f"{split}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: set QDISTILL_DATA to the shared data")
        with np.load(path) as npz:
            labels = npz["labels"]
            chosen = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
            images = torch.from_numpy(npz["images"][chosen]).permute(0, 3, 1, 2).float() / 255
            labels = torch.from_numpy(labels[chosen]).long()
        mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
        out[f"{split}_x"] = ((images - mean) / std).to(device)
        out[f"{split}_y"] = labels.to(device)
    return out


def tiny_cnn(width: int, depth: int) -> nn.Sequential:
    """``depth`` conv-BN-ReLU-pool blocks of ``width * 2**i`` channels and a linear head."""
    layers, channels = [], 3
    for i in range(depth):
        out = width * 2**i
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def batches(
    data: dict, batch_size: int, seed: int, teacher_logits: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled training batches with light augmentation (random horizontal flips);
    with a :func:`teacher_logit_table`, each batch also brings its images' teacher logits."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data["train_x"], data["train_y"]
    while True:
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            images = x[idx]
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            if teacher_logits is None:
                yield images, y[idx]
            else:
                yield images, y[idx], teacher_logits[idx.to(flip.device), flip.long()]


@torch.no_grad()
def teacher_logit_table(teacher: nn.Module, data: dict, chunk: int = 256) -> torch.Tensor:
    """The frozen teacher's logits on every training image as is and mirrored, ``[N, 2,
    classes]``: the only two views :func:`batches` makes, so distilling from the table is
    distilling from the teacher, which then runs once per image and view instead of once per
    step (4 MB for CIFAR-10; half the teacher forwards of a 3,000-step run of 64 images)."""
    teacher.eval()
    x = data["train_x"]
    views = []
    for start in range(0, len(x), chunk):
        images = x[start : start + chunk]
        views.append(torch.stack([teacher(images), teacher(images.flip(-1))], dim=1))
    return torch.cat(views)


def progress(iterator: Iterator, steps: int, desc: str) -> Iterator:
    """Training batches with a progress bar on stderr (a line every ten seconds at most)."""
    return tqdm(iterator, total=steps, desc=desc, unit="step", mininterval=10, leave=False)


@torch.no_grad()
def accuracy(model: nn.Module, data: dict) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data["test_y"]), 500):
        logits = model(data["test_x"][start : start + 500])
        correct += int((logits.argmax(1) == data["test_y"][start : start + 500]).sum())
    return 100.0 * correct / len(data["test_y"])


def _optimizer(model: nn.Module, cfg: SmallRunConfig, steps: int):
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9, nesterov=True
    )
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(steps, 1))


def _logits(teacher: nn.Module, data: dict, table: torch.Tensor | None) -> torch.Tensor:
    """The caller's :func:`teacher_logit_table` of ``teacher``, or one computed now."""
    return table if table is not None else teacher_logit_table(compressor.freeze_(teacher), data)


def _train(model, teacher, data, cfg, steps, alpha, desc, table=None):
    opt, sched = _optimizer(model, cfg, steps)
    table = None if teacher is None else _logits(teacher, data, table)
    return quantized_distillation(
        model,
        None,
        progress(batches(data, cfg.batch_size, cfg.seed, table), steps, desc),
        opt,
        steps,
        DistillConfig(cfg.temperature, alpha),
        scheduler=sched,
    )


def train_teacher(data: dict, cfg: SmallRunConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    teacher = tiny_cnn(cfg.teacher_width, cfg.teacher_depth).to(cfg.device)
    _train(teacher, None, data, cfg, cfg.steps, cfg.alpha, "teacher")
    return teacher


def student(cfg: SmallRunConfig) -> nn.Module:
    torch.manual_seed(cfg.seed + 1)
    return tiny_cnn(cfg.student_width, cfg.student_depth).to(cfg.device)


# The run_* functions take the teacher's ``table`` (:func:`teacher_logit_table`) when the
# caller already has it, so that a recipe computes it once for all of its runs.


def run_fp32_student(
    data: dict, cfg: SmallRunConfig, teacher: nn.Module | None, table: torch.Tensor | None = None
) -> nn.Module:
    model = student(cfg)
    desc = "student fp32" + (" distilled" if teacher is not None else "")
    _train(model, teacher, data, cfg, cfg.steps, cfg.alpha, desc, table)
    return model


def run_post_training(model: nn.Module, bits: int) -> nn.Module:
    """PM quantization: quantize a trained model's weights once, no training."""
    quantized = copy.deepcopy(model)
    compressor.quantize_(quantized, compressor.QuantConfig(bits=bits))
    return compressor.materialize_(quantized.to(_device(model)))


def run_quantized_distillation(
    data: dict,
    cfg: SmallRunConfig,
    teacher: nn.Module,
    bits: int,
    table: torch.Tensor | None = None,
    grid: str = "minmax",
) -> tuple[nn.Module, list[dict]]:
    """Quantized distillation of a fresh student; ``grid="int4_kernel"`` (4 bits) trains its
    2-D weights on the int4 kernel's grid (convolutions keep the min-max grid)."""
    model = student(cfg)
    bucket = 256  # the min-max rows' size; the kernel grid needs groups that divide K
    if grid == "int4_kernel":
        k = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
        bucket = max((g for g in compressor.KERNEL_GROUP_SIZES if k % g == 0), default=bucket)
    config = compressor.QuantConfig(bits=bits, bucket_size=bucket, grid=grid)
    compressor.quantize_(model, config).to(cfg.device)
    label = f"QD {bits}-bit" + (", int4 kernel grid" if grid == "int4_kernel" else "")
    history = _train(model, teacher, data, cfg, cfg.steps, cfg.alpha, label, table)
    return compressor.materialize_(model), history


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cross_entropy(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs), target)


def run_differentiable_quantization(
    data: dict,
    cfg: SmallRunConfig,
    teacher: nn.Module,
    fp32_student: nn.Module,
    bits: int,
    unit: str = "bits",
    table: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, int]]:
    """Algorithm 2 with bit allocation (a budget of code bits, or with ``unit="points"`` the
    paper's budget of points), starting from the trained full-precision student."""
    model = copy.deepcopy(fp32_student).train()  # accuracy() may have left it in eval mode
    points = allocate_bits(
        model, batches(data, cfg.batch_size, cfg.seed), _cross_entropy, bits, unit=unit
    )
    config = compressor.QuantConfig(bits=bits, method="differentiable", num_points=points)
    compressor.quantize_(model, config).to(cfg.device)
    table = _logits(teacher, data, table)
    differentiable_quantization(
        model,
        progress(batches(data, cfg.batch_size, cfg.seed + 2, table), cfg.steps, f"DQ {bits}-bit"),
        cfg.steps,
        teacher=teacher,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
    )
    return compressor.materialize_(model), points


# The QKD ablation: one low-bit network (weights and activations on LSQ quantizers) trained
# three ways on the same budget. QKD's phases split it 1:1:2 (self-studying, co-studying,
# tutoring): the paper trains its tutoring phase longest; it does not give proportions for a
# fixed budget, so this is our reading.
WA_METHODS = ("qat", "qat_kd", "qkd")
QKD_PHASES = (1, 1, 2)


def wa_student(
    model: nn.Module, bits: int, act_bits: int, data: dict, cfg: SmallRunConfig
) -> nn.Module:
    """``model`` quantized in place to W{bits}A{act_bits} with LSQ quantizers, the first and
    last layers left in full precision (as QIL and QKD do), the activation steps set from one
    batch of training images."""
    config = compressor.QuantConfig(
        bits=bits, method="lsq", act_bits=act_bits, keep_first_last=True
    )
    compressor.quantize_(model, config).to(cfg.device)
    model.eval()  # the batch sets the steps; it must not move the BatchNorm statistics
    with torch.no_grad():
        model(data["train_x"][: cfg.batch_size])
    return model.train()


def qkd_schedule(cfg: SmallRunConfig, phases: tuple[int, int, int] = QKD_PHASES) -> QKDSchedule:
    """``cfg.steps`` split in the proportions ``phases``, tutoring taking what rounding leaves."""
    first = cfg.steps * phases[0] // sum(phases)
    second = cfg.steps * phases[1] // sum(phases)
    return QKDSchedule(first, second, cfg.steps - first - second, cfg.temperature, cfg.alpha)


def run_wa_quantization(
    data: dict,
    cfg: SmallRunConfig,
    teacher: nn.Module,
    init: nn.Module | None,
    bits: int,
    method: str = "qkd",
    act_bits: int | None = None,
    table: torch.Tensor | None = None,
    phases: tuple[int, int, int] = QKD_PHASES,
    teacher_lr: float | None = None,
) -> tuple[nn.Module, dict]:
    """Weights and activations quantized (:func:`wa_student`) and trained for ``cfg.steps``
    steps, one of three ways: ``"qat"`` on the labels alone, ``"qat_kd"`` distilling from the
    frozen teacher (``cfg.temperature``, ``cfg.alpha``), ``"qkd"`` the three phases
    (:func:`qkd_schedule`) on a copy of the teacher. Every way starts from ``init`` (a trained
    full-precision student, as QKD fine-tunes one; None: from scratch), sees the same batches
    (``cfg.seed`` fixes their order) and the same optimizer and learning-rate schedule (a fifth
    of ``cfg.lr`` with ``init``). QKD's teacher learns at ``teacher_lr`` in co-studying (SGD
    with momentum; default a tenth of ``cfg.lr``). Returns the materialized model and what the
    run measured: the history, and for QKD its phases and the teacher's accuracy before and
    after co-studying."""
    if method not in WA_METHODS:
        raise ValueError(f"method must be one of {WA_METHODS}, got {method!r}")
    act_bits = bits if act_bits is None else act_bits
    model = wa_student(
        copy.deepcopy(init) if init is not None else student(cfg), bits, act_bits, data, cfg
    )
    lr = cfg.lr / 5 if init is not None else cfg.lr
    optimizer, scheduler = _optimizer(model, replace(cfg, lr=lr), cfg.steps)
    label = {"qat": "QAT", "qat_kd": "QAT + KD", "qkd": "QKD"}[method]
    desc = f"{label} W{bits}A{act_bits}"
    info: dict = {}
    if method == "qkd":
        tutor = copy.deepcopy(teacher)
        schedule = qkd_schedule(cfg, phases)
        info["phases"] = {
            "self_studying": schedule.self_studying_steps,
            "co_studying": schedule.co_studying_steps,
            "tutoring": schedule.tutoring_steps,
        }
        info["history"] = qkd_train(
            model,
            tutor,
            progress(batches(data, cfg.batch_size, cfg.seed), cfg.steps, desc),
            schedule,
            optimizer,
            torch.optim.SGD(
                tutor.parameters(),
                lr=cfg.lr / 10 if teacher_lr is None else teacher_lr,
                momentum=0.9,
            ),
            scheduler=scheduler,
        )
        info["teacher_accuracy"] = accuracy(teacher, data)
        info["co_studied_teacher_accuracy"] = accuracy(tutor, data)
    else:
        ahead = None if method == "qat" else _logits(teacher, data, table)
        info["history"] = quantized_distillation(
            model,
            None,
            progress(batches(data, cfg.batch_size, cfg.seed, ahead), cfg.steps, desc),
            optimizer,
            cfg.steps,
            DistillConfig(cfg.temperature, cfg.alpha),
            scheduler=scheduler,
        )
    return compressor.materialize_(model), info


def run_qkd(
    data: dict,
    cfg: SmallRunConfig,
    teacher: nn.Module,
    init: nn.Module | None = None,
    bits: int = 4,
    act_bits: int = 4,
) -> tuple[nn.Module, list[dict]]:
    """QKD W{bits}A{act_bits} (:func:`run_wa_quantization`); returns the model and history."""
    model, info = run_wa_quantization(data, cfg, teacher, init, bits, "qkd", act_bits)
    return model, info["history"]


def run_all(cfg: SmallRunConfig, root: Path | None = None) -> dict[str, float]:
    """Every method once; returns test accuracy (%) by method name."""
    torch.manual_seed(cfg.seed)
    data = load_cifar10(
        root or data_root(), cfg.train_images, cfg.test_images, cfg.seed, cfg.device
    )
    teacher = train_teacher(data, cfg)
    results = {"teacher fp32": accuracy(teacher, data)}
    table = teacher_logit_table(compressor.freeze_(teacher), data)
    plain = run_fp32_student(data, cfg, None)
    distilled = run_fp32_student(data, cfg, teacher, table)
    results["student fp32"] = accuracy(plain, data)
    results["student fp32 distilled"] = accuracy(distilled, data)
    for bits in (2, 4, 8):
        results[f"PM {bits}-bit"] = accuracy(run_post_training(distilled, bits), data)
        results[f"quantized distillation {bits}-bit"] = accuracy(
            run_quantized_distillation(data, cfg, teacher, bits, table)[0], data
        )
    for bits in (2, 4):
        model, _ = run_differentiable_quantization(data, cfg, teacher, distilled, bits, table=table)
        results[f"differentiable quantization {bits}-bit"] = accuracy(model, data)
    results["QKD W4A4"] = accuracy(run_qkd(data, cfg, teacher, init=plain)[0], data)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="small CIFAR-10 runs of every method")
    for field, value in asdict(SmallRunConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", help="write the accuracies here")
    args = parser.parse_args(argv)
    cfg = replace(SmallRunConfig(), **{k: v for k, v in vars(args).items() if k != "json"})
    results = run_all(cfg)
    for name, acc in results.items():
        print(f"{name:<40} {acc:6.2f}%")
    if args.json:
        atomic_write_json(args.json, {"config": asdict(cfg), "accuracy": results})


if __name__ == "__main__":
    main()
