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
from compressor.format.files import CheckpointError, load_checkpoint
from compressor.training.distillation import distillation_loss
from vision_plugin.data import DataError, load_data
from vision_plugin.models import ModelError, build_model, build_teacher, load_state, load_weights_

PHASES = ("self-studying", "co-studying", "tutoring")


class UsageError(ValueError):
    """A bad combination of options (reported as one line)."""


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
    return args.rank == 0


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

    def __getitem__(self, index: int):  # noqa: ANN204
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]


def make_loaders(args: argparse.Namespace, train_set, val_set):  # noqa: ANN001, ANN201
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


def train_one_epoch(model, teacher, train_loader, optimizer, teacher_optimizer, epoch, args):  # noqa: ANN001, ANN201
    model.train()
    phase = phase_of(epoch, args)
    teacher_learns = phase == "co-studying"
    if teacher is not None:
        teacher.train(teacher_learns)
    totals = [0.0, 0.0]
    progress = tqdm(
        train_loader, desc=f"epoch {epoch}", disable=not is_main(args) or args.quiet, leave=False
    )
    for step, (images, target) in enumerate(progress):
        images, target = images.to(args.device), target.to(args.device)
        optimizer.zero_grad(set_to_none=True)
        with compressor.cached():
            logits = model(images)
            if teacher is None or phase == "self-studying":
                loss = nn.functional.cross_entropy(
                    logits, target, label_smoothing=args.label_smoothing
                )
            else:
                with torch.set_grad_enabled(teacher_learns):
                    teacher_logits = teacher(images)
                loss = distillation_loss(
                    logits,
                    teacher_logits.detach(),
                    target,
                    args.distill_temperature,
                    args.distill_alpha,
                )
            loss.backward()
        if not torch.isfinite(loss.detach()):
            raise UsageError(f"the loss became {float(loss)} at epoch {epoch}; lower --lr")
        optimizer.step()
        if teacher_learns:
            teacher_optimizer.zero_grad(set_to_none=True)
            distillation_loss(
                teacher_logits,
                logits.detach(),
                target,
                args.distill_temperature,
                args.distill_alpha,
            ).backward()
            teacher_optimizer.step()
        totals[0] += float(loss.detach()) * len(target)
        totals[1] += len(target)
        if step % args.print_freq == 0:
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
    loss_sum, count = reduce_sum(totals, args)
    return loss_sum / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, args: argparse.Namespace) -> dict[str, float]:  # noqa: ANN001
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


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fp32_bytes(state: dict[str, torch.Tensor], path: Path) -> int:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path.stat().st_size


def quant_config(args: argparse.Namespace) -> compressor.QuantConfig:
    method = (
        "lsq"
        if any((args.qkd_self_epochs, args.qkd_co_epochs, args.qkd_tutor_epochs))
        else args.quant_method
    )
    return compressor.QuantConfig(
        bits=args.quant_bits,
        bucket_size=args.quant_bucket_size,
        method=method,
        keep_first_last=args.keep_first_last,
        act_bits=args.act_bits,
    )


def build_student(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.weights:  # pretrained student weights, as --weights means in the references
        return build_teacher(args.model, num_classes, args.weights, None, args.cifar_stem)
    model = build_model(args.model, num_classes, args.cifar_stem, args.dropout)
    if args.student_checkpoint:
        load_weights_(
            model,
            load_state(args.student_checkpoint),
            f"student checkpoint {args.student_checkpoint}",
        )
    return model


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.quant_bits <= 8:
        raise UsageError(f"--quant-bits must be from 1 to 8, got {args.quant_bits}")
    if args.act_bits is not None and not 1 <= args.act_bits <= 8:
        raise UsageError(f"--act-bits must be from 1 to 8, got {args.act_bits}")
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
    if args.post_training_only and not args.student_checkpoint:
        raise UsageError(
            "--post-training-only quantizes a trained model: give --student-checkpoint"
        )


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    init_distributed(args)
    torch.manual_seed(args.seed)
    if args.use_deterministic_algorithms:
        torch.use_deterministic_algorithms(True)
    output = Path(args.output_dir) if args.output_dir else None
    if output and is_main(args):
        output.mkdir(parents=True, exist_ok=True)

    train_set, val_set, num_classes = load_data(args)
    train_loader, val_loader, train_sampler = make_loaders(
        args, SeededAugmentation(train_set, args.seed), val_set
    )

    if args.test_only:
        if not args.resume:
            raise UsageError(
                "--test-only evaluates --resume CHECKPOINT (a .pth or a packed .qd file)"
            )
        model = build_model(args.model, num_classes, args.cifar_stem, args.dropout)
        state = load_state(args.resume)
        load_weights_(model, state, args.resume)
        metrics = evaluate(model.to(args.device), val_loader, args)
        if is_main(args):
            print(f"Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f}")
        return metrics

    teacher = None
    if args.teacher:
        teacher = build_teacher(
            args.teacher,
            num_classes,
            args.teacher_weights,
            args.teacher_checkpoint,
            args.cifar_stem,
        ).to(args.device)
    student = build_student(args, num_classes)
    config = quant_config(args)
    if not args.full_precision:
        compressor.quantize_(student, config)
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
    params = [{"params": [p for p in model.parameters()
                          if p.requires_grad and id(p) not in learned]}]  # fmt: skip
    if points:
        params.append({"params": points, "lr": args.points_lr, "weight_decay": 0.0})
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    elif args.opt == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        raise UsageError(f"--opt {args.opt!r} is not supported; use sgd or adamw")
    if config.method == "differentiable" and not args.full_precision:
        compressor.keep_points_constrained(optimizer, student)
    teacher_optimizer = None
    if teacher is not None:
        teacher_optimizer = torch.optim.SGD(
            teacher.parameters(), lr=args.lr / 10, momentum=args.momentum
        )
    if args.lr_scheduler == "steplr":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step_size, args.lr_gamma)
    elif args.lr_scheduler == "cosineannealinglr":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    else:
        raise UsageError(f"--lr-scheduler {args.lr_scheduler!r}: use steplr or cosineannealinglr")

    if args.resume:
        try:
            checkpoint = load_checkpoint(args.resume)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if teacher is not None and "teacher" in checkpoint:
            getattr(teacher, "module", teacher).load_state_dict(checkpoint["teacher"])
        args.start_epoch = checkpoint["epoch"] + 1
        torch.set_rng_state(checkpoint["rng"])

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
            }
            if teacher is not None and args.qkd_co_epochs:
                checkpoint["teacher"] = getattr(teacher, "module", teacher).state_dict()
            save_atomic(checkpoint, output / f"model_{epoch}.pth")
            save_atomic(checkpoint, output / "checkpoint.pth")

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
        (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
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
    parser.add_argument("--model", default="resnet18", help="student architecture")
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
    parser.add_argument("--output-dir", default=".", type=str)
    parser.add_argument("--resume", default="", type=str, help="checkpoint to resume (or to test)")
    parser.add_argument("--start-epoch", default=0, type=int)
    parser.add_argument("--test-only", action="store_true")
    parser.add_argument("--weights", default=None, help="torchvision weights enum for the student")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--use-deterministic-algorithms", action="store_true")
    parser.add_argument("--train-crop-size", default=224, type=int)
    parser.add_argument("--val-resize-size", default=256, type=int)
    parser.add_argument("--val-crop-size", default=224, type=int)
    parser.add_argument("--interpolation", default="bilinear", type=str)
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
        "--points-lr",
        default=1e-5,
        type=float,
        help="learning rate of the learned points of --quant-method differentiable",
    )
    parser.add_argument("--keep-first-last", action="store_true")
    parser.add_argument("--act-bits", default=None, type=int)
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
    except (UsageError, DataError, ModelError) as exc:
        print(f"qdistill-vision-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(run())


if __name__ == "__main__":
    cli()
