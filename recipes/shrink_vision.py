"""Shrink the depth of torchvision teachers to initialise shallower students.

ResNet / WideResNet: a student stage keeps a selection of the teacher stage's blocks (first k,
evenly spaced, or an explicit list); the stem, the first block of each stage (which changes the
resolution and width) and the classifier are always copied, so the student starts from the
teacher's own features. VGG and plain CNN stacks (``nn.Sequential`` of conv layers): the student
keeps a selection of the conv layers, each with the BatchNorm, ReLU and pooling that follow it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.format.files import WRITTEN_BY, atomic_save, load_checkpoint

SHRINK = "shrink"
"""The :data:`compressor.format.files.WRITTEN_BY` mark of a ``qdistill shrink`` output."""

RESNET_LAYOUTS = {
    "resnet18": ("basic", [2, 2, 2, 2], 64),
    "resnet34": ("basic", [3, 4, 6, 3], 64),
    "resnet50": ("bottleneck", [3, 4, 6, 3], 64),
    "resnet101": ("bottleneck", [3, 4, 23, 3], 64),
    "resnet152": ("bottleneck", [3, 8, 36, 3], 64),
    "wide_resnet50_2": ("bottleneck", [3, 4, 6, 3], 128),
    "wide_resnet101_2": ("bottleneck", [3, 4, 23, 3], 128),
}


def select_indices(count: int, keep: int, select: str | Sequence[int]) -> list[int]:
    """Which of ``count`` teacher layers a student with ``keep`` layers copies."""
    if keep < 1:
        raise ValueError(f"keep at least one block or layer per stage, got {keep}; use 1 or more")
    if keep > count:
        raise ValueError(
            f"cannot keep {keep} layers of a teacher stage that has only {count}; use <= {count}"
        )
    if isinstance(select, str) and select == "first":
        return list(range(keep))
    if isinstance(select, str) and select == "even":
        if keep == 1:
            return [0]
        return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})
    try:
        indices = [int(i) for i in (select.split(",") if isinstance(select, str) else select)]
    except ValueError:
        raise ValueError(
            f"selection {select!r} is not 'first', 'even' or a list of layer numbers like 0,2"
        ) from None
    if len(indices) != keep:
        raise ValueError(f"selection {indices} names {len(indices)} layers but {keep} are kept")
    if any(i < 0 or i >= count for i in indices):
        raise ValueError(f"selection {indices} is out of range for a stage of {count} layers")
    if sorted(set(indices)) != indices:
        raise ValueError(f"selection {indices} must be strictly increasing")
    return indices


def load_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a torchvision references checkpoint ({"model": ...}, with its
    ``args`` Namespace) or a bare one, loaded by :func:`compressor.format.files.load_checkpoint`
    (raises its ``CheckpointError``, a ``ValueError``, for a file that is not one)."""
    state = load_checkpoint(checkpoint)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(
            f"{checkpoint} holds no state dict (tensors by name, or a dict with a 'model' key "
            "holding them)"
        )
    return state


def check_resnet_state(state: dict[str, torch.Tensor], arch: str) -> None:
    """A one-line ValueError unless ``state`` looks like a torchvision ResNet's weights."""
    if any(".parametrizations." in key for key in state):
        raise ValueError(
            "the checkpoint holds quantized (parametrized) weights, a quantized student's "
            "training checkpoint; shrink the full-precision teacher's checkpoint instead"
        )
    needed = ("conv1.weight", "bn1.weight", "fc.weight", "layer1.0.conv1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        example = ", ".join(list(state)[:3])
        raise ValueError(
            f"the checkpoint is not a torchvision ResNet's state dict (no {', '.join(missing)}; "
            f"it has {example}, ...); pass a ResNet checkpoint, or the right --arch"
        )
    if state["fc.weight"].dim() != 2 or state["conv1.weight"].dim() != 4:
        raise ValueError("the checkpoint's fc/conv1 weights have the wrong shape for a ResNet")
    kind, counts, _ = RESNET_LAYOUTS[arch]
    found = [
        len({key.split(".")[1] for key in state if key.startswith(f"layer{stage}.")})
        for stage in range(1, len(counts) + 1)
    ]
    bottleneck = "layer1.0.conv3.weight" in state
    if found != counts or bottleneck != (kind == "bottleneck"):
        blocks = "bottleneck" if bottleneck else "basic"
        raise ValueError(
            f"the checkpoint has {','.join(map(str, found))} {blocks} blocks per stage, not "
            f"{arch}'s {','.join(map(str, counts))} {kind} blocks; check --arch"
        )


def stage_selections(stage_counts, blocks, select) -> list[list[int]]:
    """Which teacher blocks each student stage keeps (ValueError for an impossible request)."""
    if len(blocks) != len(stage_counts):
        raise ValueError(f"--blocks needs {len(stage_counts)} values, got {len(blocks)}")
    if isinstance(select, str) and select not in ("first", "even"):
        per_stage = select.split(";") if ";" in select else select.split("/")
        if len(per_stage) != len(stage_counts):
            raise ValueError(
                "an explicit resnet selection names each stage's blocks, stages separated by "
                f"'/', e.g. '0,1/0,3/0,2/0,2'; got {select!r}"
            )
        return [select_indices(c, k, s) for c, k, s in zip(stage_counts, blocks, per_stage)]
    return [select_indices(c, k, select) for c, k in zip(stage_counts, blocks)]


def shrink_resnet(
    teacher: nn.Module | dict[str, torch.Tensor],
    arch: str,
    blocks: Sequence[int],
    select: str | Sequence[str] = "first",
    num_classes: int | None = None,
    cifar_stem: bool = False,
) -> tuple[nn.Module, dict]:
    """Return ``(student, summary)``: a ResNet with ``blocks`` blocks per stage whose weights
    are the selected teacher blocks. ``select`` is "first", "even" or per-stage lists
    ("0,2/0,1,3/..."); block 0 of each stage should be kept (it holds the downsampling)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if arch not in RESNET_LAYOUTS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(RESNET_LAYOUTS)}")
    kind, counts, width = RESNET_LAYOUTS[arch]
    state = teacher.state_dict() if isinstance(teacher, nn.Module) else dict(teacher)
    check_resnet_state(state, arch)
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"--num-classes must be 1 or more, got {num_classes}")
    blocks = [int(b) for b in blocks]
    if isinstance(select, (list, tuple)):
        select = "/".join(select)
    kept = stage_selections(counts, blocks, select)
    if num_classes is None:
        num_classes = state["fc.weight"].shape[0]
    block = BasicBlock if kind == "basic" else Bottleneck
    student = ResNet(block, blocks, num_classes=num_classes, width_per_group=width)
    if cifar_stem or state.get("conv1.weight", torch.empty(0, 0, 7)).shape[-1] == 3:
        from vision_plugin.models import cifar_stem_

        cifar_stem_(student)
    new_state = {}
    for key, value in state.items():
        if not key.startswith("layer"):
            new_state[key] = value
            continue
        stage_name, index, rest = key.split(".", 2)
        stage = int(stage_name[len("layer") :]) - 1
        if int(index) in kept[stage]:
            new_state[f"{stage_name}.{kept[stage].index(int(index))}.{rest}"] = value
    fresh = []
    if new_state["fc.weight"].shape[0] != num_classes:
        del new_state["fc.weight"], new_state["fc.bias"]
        fresh.append("fc")
    if new_state["conv1.weight"].shape != student.conv1.weight.shape:
        del new_state["conv1.weight"]  # ImageNet 7x7 stem into a CIFAR 3x3 stem: start fresh
        fresh.append("conv1")
    try:
        missing, unexpected = student.load_state_dict(new_state, strict=False)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(
            f"teacher weights do not fit {arch}: {lines[1] if len(lines) > 1 else lines[0]}; "
            "check --arch"
        ) from None
    missing = [k for k in missing if k.split(".")[0] not in fresh]
    if unexpected or missing:
        raise ValueError(
            f"teacher weights do not fit {arch}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; check --arch"
        )
    summary = {
        "arch": arch,
        "teacher_blocks": counts,
        "blocks": blocks,
        "kept": kept,
        "freshly_initialised": fresh,
        "cifar_stem": isinstance(student.maxpool, nn.Identity),
    }
    return student, summary


def shrink_sequential(
    features: nn.Sequential, keep: int, select: str | Sequence[int] = "first"
) -> tuple[nn.Sequential, dict]:
    """Keep ``keep`` of the conv layers of a VGG-style stack (each conv with the non-conv
    layers that follow it up to the next conv). Raises ValueError when channels don't chain."""
    import copy

    groups: list[list[nn.Module]] = []
    prefix: list[nn.Module] = []
    for module in features:
        if isinstance(module, nn.Conv2d):
            groups.append([module])
        elif groups:
            groups[-1].append(module)
        else:
            prefix.append(module)
    indices = select_indices(len(groups), keep, select)
    channels = None
    layers: list[nn.Module] = [copy.deepcopy(m) for m in prefix]
    for i in indices:
        conv = groups[i][0]
        if channels is not None and conv.in_channels != channels:
            raise ValueError(
                f"conv {i} takes {conv.in_channels} channels but the previous kept conv gives "
                f"{channels}; keep layers whose channels chain"
            )
        channels = conv.out_channels
        layers.extend(copy.deepcopy(m) for m in groups[i])
    if groups and groups[0][0].in_channels != groups[indices[0]][0].in_channels:
        raise ValueError(f"the first kept conv ({indices[0]}) does not take the input channels")
    if channels != groups[-1][0].out_channels:
        raise ValueError(
            "the last kept conv must give the teacher's output channels "
            f"({groups[-1][0].out_channels}), got {channels}"
        )
    return nn.Sequential(*layers), {"conv_layers": len(groups), "kept": indices}


VGG_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")


def vgg_student(arch: str, kept: Sequence[int], num_classes: int = 1000) -> nn.Module:
    """The (untrained) student architecture that :func:`shrink_vgg` made: torchvision's
    ``arch`` with only the conv layers ``kept``. Build it to load a shrunk checkpoint."""
    import torchvision

    if arch not in VGG_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; VGG students come from {VGG_ARCHS}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    model.features, _ = shrink_sequential(model.features, len(kept), list(kept))
    return model


def shrink_vgg(
    state: dict[str, torch.Tensor],
    arch: str,
    keep: int,
    select: str | Sequence[int] = "first",
    num_classes: int | None = None,
) -> tuple[nn.Module, dict]:
    """A VGG student with ``keep`` of the teacher's conv layers, initialised from them; the
    classifier is the teacher's (adaptive pooling keeps its input size)."""
    import torchvision

    if arch not in VGG_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; VGG teachers are {VGG_ARCHS}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"--num-classes must be 1 or more, got {num_classes}")
    if not any(k.startswith("features.") for k in state):
        raise ValueError(
            f"the checkpoint is not a torchvision VGG's state dict (no features.*; it has "
            f"{', '.join(list(state)[:3])}, ...); pass a VGG checkpoint, or the right --arch"
        )
    if num_classes is None:
        num_classes = (
            state["classifier.6.weight"].shape[0] if "classifier.6.weight" in state else 1000
        )
    teacher = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint is not a {arch}: {str(exc).splitlines()[0]}") from None
    features, info = shrink_sequential(teacher.features, keep, select)
    teacher.features = features
    summary = {
        "arch": arch,
        "conv_layers": [info["conv_layers"], keep],
        "kept": info["kept"],
        "num_classes": num_classes,
    }
    return teacher, summary


def save_references_checkpoint(model: nn.Module, summary: dict, output: str | Path) -> None:
    """Write {"model", "optimizer", "lr_scheduler", "epoch", "args"} atomically, marked as a
    ``qdistill shrink`` output (callers check ``output`` first with
    :func:`compressor.format.files.check_output`)."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": None,
        "lr_scheduler": None,
        "epoch": 0,
        "args": summary,
        WRITTEN_BY: SHRINK,
    }
    atomic_save(checkpoint, output)
