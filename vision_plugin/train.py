"""Compress a torchvision classifier: quantized distillation from a (pretrained) teacher into a
shallower, low-bit student, with the argument names of torchvision's classification
references.

    python -m vision_plugin.train --data-path ../shared/data/cifar10 --model resnet18 \\
        --teacher resnet34 --teacher-checkpoint teacher.pth --cifar-stem --quant-bits 4 \\
        --epochs 30 -b 128 --lr 0.1 --output-dir runs/r18-4bit
    torchrun --nproc_per_node 2 -m vision_plugin.train ...   # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import compressor
from compressor.cli import UsageError
from compressor.format.files import (
    WRITTEN_BY,
    CheckpointError,
    OutputError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    same_file,
)
from compressor.quantization.grids import check_bits
from compressor.training.step import DistillConfig, distill_step
from vision_plugin.data import DataError, interpolation_modes, load_data
from vision_plugin.models import (
    ModelError,
    build_model,
    build_teacher,
    is_tensor_file,
    load_state,
    load_weights_,
    read_checkpoint,
    state_of,
)

PHASES = ("self-studying", "co-studying", "tutoring")
WRITER = "vision_plugin.train"
DEFAULT_MODEL = "resnet18"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("steplr", "cosineannealinglr")
TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "epoch")
# What a training checkpoint's weights depend on: how the student was built and quantized.
RECORDED = (
    "model",
    "cifar_stem",
    "full_precision",
    "quant_bits",
    "quant_bucket_size",
    "quant_method",
    "keep_first_last",
    "act_bits",
    "qkd_self_epochs",
    "qkd_co_epochs",
    "qkd_tutor_epochs",
)


# ---------------------------------------------------------------------------------------------
# Distributed helpers.


def init_distributed(args: argparse.Namespace) -> None:
    args.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    args.rank, args.world_size = 0, 1
    if not args.distributed:
        return
    args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if args.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group(backend)


def is_main(args: argparse.Namespace) -> bool:
    return getattr(args, "rank", 0) == 0


def reduce_sum(values: list[float], args: argparse.Namespace) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device="cpu")
    if args.distributed:
        if args.device.startswith("cuda"):
            tensor = tensor.to(args.device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


# ---------------------------------------------------------------------------------------------
# Data with reproducible augmentation.


class SeededAugmentation(torch.utils.data.Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index), so a
    run gives the same batches whatever the number of processes, and after a resume."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
            torch.manual_seed(seed % 2**63)
            return self.dataset[index]


def make_loaders(args: argparse.Namespace, train_set, val_set):
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_set, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed
    )
    val_sampler = torch.utils.data.distributed.DistributedSampler(
        val_set, num_replicas=args.world_size, rank=args.rank, shuffle=False
    )
    if args.batch_size % args.world_size:
        raise UsageError(
            f"-b {args.batch_size} must be divisible by the {args.world_size} processes"
        )
    local_batch = args.batch_size // args.world_size  # -b is the global batch
    train = torch.utils.data.DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=train_sampler,
        num_workers=args.workers,
        drop_last=True,
    )
    val = torch.utils.data.DataLoader(
        val_set, batch_size=local_batch, sampler=val_sampler, num_workers=args.workers
    )
    return train, val, train_sampler


# ---------------------------------------------------------------------------------------------
# Training and evaluation.


def phase_of(epoch: int, args: argparse.Namespace) -> str | None:
    """QKD phase of an epoch, or None when no QKD phases are set."""
    phases = (args.qkd_self_epochs, args.qkd_co_epochs, args.qkd_tutor_epochs)
    if not any(phases):
        return None
    if epoch < phases[0]:
        return PHASES[0]
    return PHASES[1] if epoch < phases[0] + phases[1] else PHASES[2]


def train_one_epoch(model, teacher, train_loader, optimizer, teacher_optimizer, epoch, args):
    """One epoch through the core's training step: quantized distillation from a frozen
    teacher, labels alone (no teacher, or QKD's self-studying), or QKD's co-studying."""
    phase = phase_of(epoch, args)
    teacher_learns = phase == "co-studying"
    source = None if teacher is None or phase == "self-studying" else teacher
    if teacher is not None and not teacher_learns:
        teacher.eval()
    config = DistillConfig(
        args.distill_temperature, args.distill_alpha, label_smoothing=args.label_smoothing
    )
    totals = [0.0, 0.0]
    progress = tqdm(
        train_loader, desc=f"epoch {epoch}", disable=not is_main(args) or args.quiet, leave=False
    )
    for step, (images, target) in enumerate(progress):
        images, target = images.to(args.device), target.to(args.device)
        try:
            result = distill_step(
                model,
                source,
                images,
                target,
                optimizer,
                config,
                teacher_optimizer=teacher_optimizer if teacher_learns else None,
            )
        except FloatingPointError as exc:
            raise UsageError(f"{exc} at epoch {epoch}; lower --lr") from None
        totals[0] += result["loss"] * len(target)
        totals[1] += len(target)
        if step % args.print_freq == 0:
            progress.set_postfix(loss=f"{result['loss']:.4f}")
    loss_sum, count = reduce_sum(totals, args)
    return loss_sum / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, args: argparse.Namespace) -> dict[str, float]:
    model.eval()
    correct1 = correct5 = seen = 0.0
    for images, target in tqdm(
        loader, desc="eval", disable=not is_main(args) or args.quiet, leave=False
    ):
        images, target = images.to(args.device), target.to(args.device)
        logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += float((top5[:, 0] == target).sum())
        correct5 += float((top5 == target[:, None]).any(1).sum())
        seen += len(target)
    correct1, correct5, seen = reduce_sum([correct1, correct5, seen], args)
    return {"acc1": 100 * correct1 / max(seen, 1), "acc5": 100 * correct5 / max(seen, 1)}


# ---------------------------------------------------------------------------------------------
# Checkpoints and files.


def fp32_bytes(state: dict[str, torch.Tensor], path: Path) -> int:
    """Write ``state`` as a .safetensors file (atomically); its size in bytes."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    return atomic_write_bytes(path, save(tensors))


def quant_config(args: argparse.Namespace) -> compressor.QuantConfig:
    method = (
        "lsq"
        if any((args.qkd_self_epochs, args.qkd_co_epochs, args.qkd_tutor_epochs))
        else args.quant_method
    )
    try:
        return compressor.QuantConfig(
            bits=args.quant_bits,
            bucket_size=args.quant_bucket_size,
            method=method,
            keep_first_last=args.keep_first_last,
            act_bits=args.act_bits,
            grid=getattr(args, "quant_grid", "minmax"),
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"quantization settings: {exc}") from None


def quantize_student_(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The student as the run trains it: quantized as ``args`` say, unless --full-precision."""
    if not args.full_precision:
        try:
            compressor.quantize_(model, quant_config(args))
        except ValueError as exc:
            raise UsageError(f"cannot quantize {args.model}: {exc}") from None
    return model


def build_student(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.weights:  # pretrained student weights, as --weights means in the references
        return build_teacher(args.model, num_classes, args.weights, None, args.cifar_stem)
    model = build_model(args.model, num_classes, args.cifar_stem, args.dropout)
    if args.student_checkpoint:
        load_weights_(
            model,
            load_state(args.student_checkpoint, "--student-checkpoint"),
            f"--student-checkpoint {args.student_checkpoint}",
            args.model,
        )
    return model


def recorded_args(checkpoint: object) -> argparse.Namespace | None:
    """The arguments a checkpoint of this script records (None for other checkpoints)."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace) and all(hasattr(args, k) for k in RECORDED):
        return args
    return None


def _setting(name: str, value: object) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"no {flag}" if value is None else f"{flag} {value}"


def describe(args: argparse.Namespace) -> str:
    stem = " --cifar-stem" if args.cifar_stem else ""
    if args.full_precision:
        return f"{args.model}{stem}, full precision"
    config = quant_config(args)
    bucket = f"bucket {config.bucket_size}" if config.bucket_size else "one bucket per tensor"
    if config.method == "lsq":
        bucket = "learned step per tensor"
    acts = f", {config.act_bits}-bit activations" if config.act_bits else ""
    return f"{args.model}{stem}, {config.bits}-bit {config.method} weights ({bucket}){acts}"


def check_args(args: argparse.Namespace) -> None:
    """Every option checked before any work: one-line UsageError, never a traceback later."""
    positive = {
        "-b": args.batch_size,
        "--print-freq": args.print_freq,
        "--lr-step-size": args.lr_step_size,
        "--train-crop-size": args.train_crop_size,
        "--val-resize-size": args.val_resize_size,
        "--val-crop-size": args.val_crop_size,
        "--max-train-samples": args.max_train_samples,
        "--max-val-samples": args.max_val_samples,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive whole number, got {value}")
    non_negative = {
        "--epochs": args.epochs,
        "--start-epoch": args.start_epoch,
        "-j/--workers": args.workers,
        "--seed": args.seed,
        "--qkd-self-epochs": args.qkd_self_epochs,
        "--qkd-co-epochs": args.qkd_co_epochs,
        "--qkd-tutor-epochs": args.qkd_tutor_epochs,
        "--lr": args.lr,
        "--momentum": args.momentum,
        "--weight-decay": args.weight_decay,
        "--quant-points-lr": args.points_lr,
    }
    for flag, value in non_negative.items():
        if not value >= 0:  # also NaN
            raise UsageError(f"{flag} must be 0 or more, got {value}")
    if not args.lr_gamma > 0:
        raise UsageError(f"--lr-gamma must be > 0, got {args.lr_gamma}")
    if not 0 <= args.label_smoothing <= 1:
        raise UsageError(f"--label-smoothing must be in [0, 1], got {args.label_smoothing}")
    if args.dropout is not None and not 0 <= args.dropout <= 1:
        raise UsageError(f"--dropout is a probability in [0, 1], got {args.dropout}")
    args.opt, args.lr_scheduler = args.opt.lower(), args.lr_scheduler.lower()
    if args.opt not in OPTIMIZERS:
        raise UsageError(f"--opt {args.opt!r} is not supported; use {' or '.join(OPTIMIZERS)}")
    if args.lr_scheduler not in SCHEDULERS:
        raise UsageError(
            f"--lr-scheduler {args.lr_scheduler!r} is not supported; use {' or '.join(SCHEDULERS)}"
        )
    if args.interpolation not in interpolation_modes():
        raise UsageError(
            f"--interpolation {args.interpolation!r} is not a mode; choose one of "
            f"{', '.join(interpolation_modes())}"
        )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available; use --device cpu")
    try:
        check_bits(args.quant_bits, "--quant-bits")
        if args.act_bits is not None:
            check_bits(args.act_bits, "--quant-act-bits")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.quant_bucket_size is not None and args.quant_bucket_size <= 0:
        raise UsageError(f"--quant-bucket-size must be positive, got {args.quant_bucket_size}")
    if not args.distill_temperature > 0:
        raise UsageError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if not 0 <= args.distill_alpha <= 1:
        raise UsageError(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if args.teacher_weights and args.teacher_checkpoint:
        raise UsageError("give either --teacher-weights or --teacher-checkpoint, not both")
    if (args.teacher_weights or args.teacher_checkpoint) and not args.teacher:
        raise UsageError("--teacher-weights/--teacher-checkpoint need --teacher ARCH")
    if args.weights and args.student_checkpoint:
        raise UsageError("give either --weights or --student-checkpoint, not both")
    if args.post_training_only and not args.student_checkpoint:
        raise UsageError(
            "--post-training-only quantizes a trained model: give --student-checkpoint"
        )
    if args.test_only and not args.resume:
        raise UsageError("--test-only evaluates --resume CHECKPOINT (a .pth or a packed .qd file)")


# ---------------------------------------------------------------------------------------------
# What a run reads and writes.


def read_resume(args: argparse.Namespace) -> dict:
    """The --resume checkpoint, checked to be a training checkpoint that fits this run; takes
    the architecture from it when --model is not given."""
    path = args.resume
    if Path(path).is_file() and is_tensor_file(Path(path)):
        raise UsageError(
            f"--resume {path} holds weights only (a packed .qd or .safetensors file), not a "
            f"training state: evaluate it with --test-only, or start a student from it with "
            f"--student-checkpoint {path}"
        )
    checkpoint = read_checkpoint(path, "--resume")
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in TRAINING_KEYS):
        raise UsageError(
            f"--resume {path} is not a training checkpoint (it lacks the optimizer, scheduler "
            "and epoch that this script saves: a plain state dict?); start the student from "
            f"its weights with --student-checkpoint {path}, or evaluate it with --test-only"
        )
    recorded = recorded_args(checkpoint)
    if recorded is not None:
        if args.model is None:
            args.model = recorded.model
        settings = (*RECORDED, "quant_grid", "opt", "lr_scheduler")
        defaults = {"quant_grid": "minmax"}  # checkpoints from before the option
        differ = [
            k
            for k in settings
            if getattr(recorded, k, defaults.get(k)) != getattr(args, k, defaults.get(k))
        ]
        if differ:
            was = " ".join(_setting(k, getattr(recorded, k, defaults.get(k))) for k in differ)
            now = " ".join(_setting(k, getattr(args, k)) for k in differ)
            raise UsageError(
                f"--resume {path} was trained with {was}, this run asks for {now}; resume "
                "with the settings it was trained with"
            )
    if not isinstance(checkpoint["epoch"], int) or checkpoint["epoch"] < 0:
        raise UsageError(f"--resume {path}: its epoch {checkpoint['epoch']!r} is not an epoch")
    return checkpoint


def planned_outputs(args: argparse.Namespace, start_epoch: int) -> list[Path]:
    """Every file the run will write into --output-dir."""
    out = Path(args.output_dir)
    epochs = range(start_epoch, 0 if args.post_training_only else args.epochs)
    files = [out / "checkpoint.pth"] if len(epochs) else []
    files += [out / f"model_{epoch}.pth" for epoch in epochs]
    files.append(out / "student_fp32.safetensors")
    if args.teacher:
        files.append(out / "teacher_fp32.safetensors")
    if not args.full_precision:
        files.append(out / "student.qd")
    return [*files, out / "summary.json"]


def _is_checkpoint_name(path: Path) -> bool:
    return path.name == "checkpoint.pth" or (
        path.name.startswith("model_") and path.suffix == ".pth"
    )


def check_outputs(args: argparse.Namespace, start_epoch: int) -> None:
    """Before any work: --output-dir is (or can be) a folder, no file the run writes is one it
    reads (also through links; the --resume source may be replaced by the run it resumes),
    and an earlier run's files are replaced only when resuming that run or with --force."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"--output-dir {out} is a file, not a folder; give a folder (it is created if missing)"
        )
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--output-dir {out}: {parent} is a file, not a folder")
    existing_folder = next(p for p in (out, *out.parents, Path(".")) if p.exists())
    if not os.access(existing_folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"--output-dir {out}: cannot write in {existing_folder} (permission denied); "
            "choose another --output-dir"
        )
    planned = planned_outputs(args, start_epoch)
    inputs = [
        ("--teacher-checkpoint", args.teacher_checkpoint),
        ("--student-checkpoint", args.student_checkpoint),
        ("--resume", args.resume),
    ]
    for target in planned:
        for flag, source in inputs:
            if not source or (flag == "--resume" and _is_checkpoint_name(target)):
                continue
            if same_file(target, source):
                raise UsageError(
                    f"--output-dir {out} would write {target.name} over the {flag} {source} "
                    "that this run reads; choose another --output-dir (or move the file)"
                )
    resuming_here = bool(args.resume) and out.is_dir() and same_file(Path(args.resume).parent, out)
    if args.force or resuming_here:
        return
    existing = [t.name for t in planned if t.exists() or t.is_symlink()]
    if existing:
        hint = (
            f" continue it with --resume {out / 'checkpoint.pth'},"
            if (out / "checkpoint.pth").is_file()
            else ""
        )
        raise UsageError(
            f"--output-dir {out} already holds {', '.join(existing[:3])}"
            f"{' ...' if len(existing) > 3 else ''} of an earlier run;{hint} choose another "
            "--output-dir, or pass --force to replace them"
        )


def load_for_evaluation(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model of --test-only --resume: a training checkpoint of this script is rebuilt as it
    was trained (architecture and quantization from the arguments it records), so that it
    evaluates to the accuracy the run reported; other files load into --model."""
    path = Path(args.resume)
    checkpoint = None
    if path.suffix not in (".qd", ".safetensors"):
        try:
            checkpoint = read_checkpoint(path, "--resume")
        except ModelError:
            checkpoint = None  # load_state says what is wrong, or reads a tensor file
    recorded = recorded_args(checkpoint)
    if recorded is not None:
        if args.model is not None and args.model != recorded.model:
            raise UsageError(
                f"--resume {path} holds a {recorded.model}, not a {args.model}; leave --model "
                "out (the checkpoint records its architecture) or give the matching one"
            )
        model = build_model(recorded.model, num_classes, recorded.cifar_stem, recorded.dropout)
        quantize_student_(model, recorded)
        load_weights_(
            model, state_of(checkpoint, path, "--resume"), f"--resume {path}", recorded.model
        )
        if is_main(args):
            print(f"{path}: epoch {checkpoint['epoch']}, {describe(recorded)}", flush=True)
        return model
    model_name = args.model or DEFAULT_MODEL
    model = build_model(model_name, num_classes, args.cifar_stem, args.dropout)
    state = (
        state_of(checkpoint, path, "--resume")
        if checkpoint is not None
        else load_state(path, "--resume")
    )
    return load_weights_(model, state, f"--resume {path}", model_name)


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    init_distributed(args)
    torch.manual_seed(args.seed)
    if args.use_deterministic_algorithms:
        torch.use_deterministic_algorithms(True)

    if args.test_only:
        train_set, val_set, num_classes = load_data(args)
        _, val_loader, _ = make_loaders(args, train_set, val_set)
        model = load_for_evaluation(args, num_classes).to(args.device)
        if compressor.is_packed(args.resume):  # on the int4 kernel grid: run on the kernel
            try:
                _, how = compressor.run_packed_on_int4_(model, args.resume)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if is_main(args):
                print(f"{args.resume}: {how}", flush=True)
        metrics = evaluate(model, val_loader, args)
        if is_main(args):
            print(f"Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f}")
        return metrics

    resumed = read_resume(args) if args.resume else None
    args.model = args.model or DEFAULT_MODEL
    if resumed is not None:
        args.start_epoch = resumed["epoch"] + 1
    output = Path(args.output_dir) if args.output_dir else None
    if output:
        check_outputs(args, args.start_epoch)
        if is_main(args):
            try:
                output.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create --output-dir {output}: {exc.strerror}") from None

    train_set, val_set, num_classes = load_data(args)
    train_loader, val_loader, train_sampler = make_loaders(
        args, SeededAugmentation(train_set, args.seed), val_set
    )
    trains = args.start_epoch < args.epochs and not args.post_training_only
    if len(train_loader) == 0 and (trains or args.act_bits is not None):
        raise UsageError(
            f"-b {args.batch_size} is larger than the {len(train_set)} training images, so an "
            "epoch has no full batch; lower -b (or raise --max-train-samples)"
        )

    teacher = None
    if args.teacher:
        teacher = build_teacher(
            args.teacher,
            num_classes,
            args.teacher_weights,
            args.teacher_checkpoint,
            args.cifar_stem,
        ).to(args.device)
    student = quantize_student_(build_student(args, num_classes), args)
    config = quant_config(args)
    student.to(args.device)
    if (
        config.act_bits is not None and not args.full_precision
    ):  # initialise the activation steps from one batch
        with torch.no_grad():
            student.eval()(
                next(iter(train_loader))[0][: max(2, args.batch_size // 4)].to(args.device)
            )

    model = student
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(student)
        if teacher is not None and args.qkd_co_epochs:
            teacher = nn.parallel.DistributedDataParallel(teacher)
    # A learned point's gradient sums over every weight it stands for, so it grows with the
    # tensor: at the weights' learning rate the points run into one end of [0, 1] and merge.
    points = compressor.point_parameters(student)
    learned = {id(p) for p in points}
    params = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in learned]}
    ]
    if points:
        params.append({"params": points, "lr": args.points_lr, "weight_decay": 0.0})
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if config.method == "differentiable" and not args.full_precision:
        compressor.keep_points_constrained(optimizer, student)
    teacher_optimizer = None
    if teacher is not None:
        teacher_optimizer = torch.optim.SGD(
            teacher.parameters(), lr=args.lr / 10, momentum=args.momentum
        )
    if args.lr_scheduler == "steplr":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step_size, args.lr_gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))

    if resumed is not None:
        what = f"--resume {args.resume}"
        load_weights_(student, state_of(resumed, args.resume, "--resume"), what, args.model)
        try:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["lr_scheduler"])
            if teacher is not None and "teacher" in resumed:
                getattr(teacher, "module", teacher).load_state_dict(resumed["teacher"])
            if "rng" in resumed:
                torch.set_rng_state(resumed["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(
                f"{what}: its optimizer or scheduler state does not fit this run ({first}); "
                "resume with the settings it was trained with"
            ) from None

    start = time.time()
    for epoch in range(args.start_epoch, 0 if args.post_training_only else args.epochs):
        train_sampler.set_epoch(epoch)
        train_loader.dataset.set_epoch(epoch)
        loss = train_one_epoch(
            model, teacher, train_loader, optimizer, teacher_optimizer, epoch, args
        )
        scheduler.step()
        metrics = evaluate(model, val_loader, args)
        if is_main(args):
            phase = phase_of(epoch, args)
            accuracy = f"Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f}"
            suffix = f" ({phase})" if phase else ""
            print(f"epoch {epoch}: loss {loss:.4f} {accuracy}{suffix}", flush=True)
        if output and is_main(args):
            checkpoint = {
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "args": args,
                "rng": torch.get_rng_state(),
                WRITTEN_BY: WRITER,
            }
            record = compressor.quantization_record(getattr(student, "module", student))
            if record:  # how each weight is quantized, as OpenNMT checkpoints carry it too
                checkpoint["qdistill"] = record.to_dict()
            if teacher is not None and args.qkd_co_epochs:
                checkpoint["teacher"] = getattr(teacher, "module", teacher).state_dict()
            atomic_save(checkpoint, output / f"model_{epoch}.pth")
            atomic_save(checkpoint, output / "checkpoint.pth")

    metrics = evaluate(model, val_loader, args)
    summary = {
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],
        "train_seconds": time.time() - start,
    }
    if output and is_main(args):
        meta = {"model": args.model, "num_classes": num_classes, "cifar_stem": args.cifar_stem}
        summary["student_fp32_bytes"] = fp32_bytes(
            compressor.shadow_state_dict(student), output / "student_fp32.safetensors"
        )
        if teacher is not None:
            teacher_state = getattr(teacher, "module", teacher).state_dict()
            summary["teacher_fp32_bytes"] = fp32_bytes(
                teacher_state, output / "teacher_fp32.safetensors"
            )
        if not args.full_precision:
            size = compressor.save_packed(student, output / "student.qd", metadata=meta)
            summary["packed_bytes"] = size
            summary["compression_vs_student_fp32"] = summary["student_fp32_bytes"] / size
            if teacher is not None:
                summary["compression_vs_teacher"] = summary["teacher_fp32_bytes"] / size
            summary["quantization"] = {
                k: v for k, v in vars(config).items() if not isinstance(v, dict)
            }
        text = json.dumps(summary, indent=2, default=str) + "\n"
        atomic_write_text(output / "summary.json", text)
        print(json.dumps({k: v for k, v in summary.items() if k != "quantization"}), flush=True)
    if args.distributed:
        dist.destroy_process_group()
    return summary


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="qdistill: compress a torchvision classifier", add_help=add_help
    )
    parser.add_argument(
        "--data-path", default=None, help="dataset root (default: $QDISTILL_DATA/cifar10)"
    )
    parser.add_argument("--dataset", default="auto", choices=("auto", "cifar10", "imagefolder"))
    parser.add_argument(
        "--model",
        default=None,
        help=f"student architecture (default: {DEFAULT_MODEL}; with --resume, the checkpoint's)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-b", "--batch-size", default=128, type=int, help="global batch size")
    parser.add_argument("--epochs", default=30, type=int)
    parser.add_argument("-j", "--workers", default=0, type=int)
    parser.add_argument("--opt", default="sgd", type=str)
    parser.add_argument("--lr", default=0.1, type=float)
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("--lr-scheduler", default="cosineannealinglr", type=str)
    parser.add_argument("--lr-step-size", default=30, type=int)
    parser.add_argument("--lr-gamma", default=0.1, type=float)
    parser.add_argument("--label-smoothing", default=0.0, type=float)
    parser.add_argument("--print-freq", default=10, type=int)
    parser.add_argument(
        "--output-dir",
        default=".",
        type=str,
        help="folder for checkpoint.pth, model_N.pth, student.qd and summary.json (default: .); "
        "never one that would replace a checkpoint the run reads",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the files of an earlier run in --output-dir (never an input)",
    )
    parser.add_argument("--resume", default="", type=str, help="checkpoint to resume (or to test)")
    parser.add_argument("--start-epoch", default=0, type=int)
    parser.add_argument("--test-only", action="store_true")
    parser.add_argument("--weights", default=None, help="torchvision weights enum for the student")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--use-deterministic-algorithms", action="store_true")
    parser.add_argument("--train-crop-size", default=224, type=int)
    parser.add_argument("--val-resize-size", default=256, type=int)
    parser.add_argument("--val-crop-size", default=224, type=int)
    parser.add_argument(
        "--interpolation", default="bilinear", type=str, help="|".join(interpolation_modes())
    )
    parser.add_argument("--max-train-samples", default=None, type=int)
    parser.add_argument("--max-val-samples", default=None, type=int)
    parser.add_argument(
        "--dropout", default=None, type=float, help="student dropout, for models that have one"
    )
    parser.add_argument(
        "--cifar-stem", action="store_true", help="3x3 stride-1 stem for 32x32 inputs"
    )
    parser.add_argument(
        "--student-checkpoint",
        default=None,
        help="initial student weights (e.g. from `qdistill shrink vision`)",
    )
    parser.add_argument("--teacher", default=None, help="teacher architecture")
    parser.add_argument(
        "--teacher-weights", default=None, help="e.g. ResNet34_Weights.IMAGENET1K_V1"
    )
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--distill-temperature", default=5.0, type=float)
    parser.add_argument("--distill-alpha", default=0.7, type=float)
    parser.add_argument("--quant-bits", default=4, type=int)
    parser.add_argument("--quant-bucket-size", default=256, type=int)
    parser.add_argument(
        "--quant-method", default="uniform", choices=("uniform", "nonuniform", "differentiable")
    )
    parser.add_argument(
        "--quant-grid",
        default="minmax",
        choices=("minmax", "int4_kernel"),
        help="int4_kernel: train on the grid of PyTorch's int4 matmul kernel, so that "
        "--test-only --resume student.qd runs the Linear layers on that kernel (needs "
        "--quant-bits 4, --quant-method uniform, --quant-bucket-size 32/64/128/256)",
    )
    parser.add_argument(
        "--quant-points-lr",
        "--points-lr",
        dest="points_lr",
        default=1e-5,
        type=float,
        help="learning rate of the learned points of --quant-method differentiable",
    )
    parser.add_argument(
        "--quant-keep-first-last",
        "--keep-first-last",
        dest="keep_first_last",
        action="store_true",
        help="leave the first and the last layer in full precision",
    )
    parser.add_argument(
        "--quant-act-bits",
        "--act-bits",
        dest="act_bits",
        default=None,
        type=int,
        help="bits of the learned activation quantizers (QKD, with the --qkd-* epochs)",
    )
    parser.add_argument("--qkd-self-epochs", default=0, type=int)
    parser.add_argument("--qkd-co-epochs", default=0, type=int)
    parser.add_argument("--qkd-tutor-epochs", default=0, type=int)
    parser.add_argument(
        "--full-precision", action="store_true", help="train without quantization (a teacher)"
    )
    parser.add_argument(
        "--post-training-only", action="store_true", help="PM baseline: quantize, no training"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (UsageError, DataError, ModelError, CheckpointError, OutputError) as exc:
        print(f"qdistill-vision-train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder without write permission
        print(f"qdistill-vision-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(run())


if __name__ == "__main__":
    cli()
