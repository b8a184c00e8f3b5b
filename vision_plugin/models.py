"""torchvision classifiers as teachers and students: building them by name, a CIFAR stem for
32x32 inputs, and loading pretrained weights through torchvision's own weights API."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.format.files import is_text_file


class ModelError(ValueError):
    """An unknown architecture, or weights that do not fit it (reported as one line)."""


def classification_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def cifar_stem_(model: nn.Module) -> nn.Module:
    """Adapt an ImageNet-shaped model to 32x32 inputs: the first convolution becomes stride 1
    (a 3x3 kernel for ResNet-style stems) and a stem max-pool is removed."""
    if isinstance(getattr(model, "conv1", None), nn.Conv2d):  # resnet, wide_resnet, resnext
        old = model.conv1
        model.conv1 = nn.Conv2d(3, old.out_channels, 3, stride=1, padding=1, bias=False)
        if hasattr(model, "maxpool"):
            model.maxpool = nn.Identity()
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # vgg, mobilenet, efficientnet, convnext, ...
            module.stride = (1, 1)
            if module.kernel_size[0] > 1 and module.padding == (0, 0):
                module.padding = (module.kernel_size[0] // 2, module.kernel_size[1] // 2)
            return model
    raise ModelError(f"{type(model).__name__} has no convolution to adapt for 32x32 inputs")


def build_model(
    name: str, num_classes: int, cifar_stem: bool = False, dropout: float | None = None
) -> nn.Module:
    """A randomly initialised torchvision classifier (``dropout`` for the families that take
    one: vgg, mobilenet, efficientnet, squeezenet, ...)."""
    import torchvision

    if name not in classification_models():
        raise ModelError(
            f"unknown model {name!r}; choose a torchvision classification model such as "
            f"resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny"
        )
    extra = {} if dropout is None else {"dropout": dropout}
    try:
        model = torchvision.models.get_model(name, num_classes=num_classes, **extra)
    except TypeError:
        raise ModelError(f"{name} takes no dropout setting; leave --dropout out") from None
    return cifar_stem_(model) if cifar_stem else model


def num_outputs(model: nn.Module) -> int:
    """Number of classes a classifier predicts (its last linear layer's outputs)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def is_tensor_file(path: Path) -> bool:
    """A .safetensors or packed .qd file (both start with a length and a JSON header)."""
    with path.open("rb") as f:
        head = f.read(16)
    return path.suffix in (".qd", ".safetensors") or head[8:9] == b"{"


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ModelError(f"{what} {path} is a folder; give the checkpoint file inside it")
    try:
        text = is_text_file(path)
    except OSError as exc:
        raise ModelError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if text:
        raise ModelError(
            f"{what} {path} is a text file, not a checkpoint: give a .pth file that torch.save "
            "wrote, a .safetensors file or a packed .qd file"
        )


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> object:
    """A pickled PyTorch checkpoint, loaded safely (nothing pickled runs); one-line
    :class:`ModelError` for a missing, text, truncated or unsafe file."""
    from compressor.format.files import CheckpointError, load_checkpoint

    path = Path(path)
    _check_file(path, what)
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise ModelError(f"{what} {exc}") from None


def state_of(checkpoint: object, path: str | Path, what: str = "checkpoint") -> dict:
    """The model weights of a checkpoint: its "model" entry (the references' format) or the
    checkpoint itself (a plain state dict)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ModelError(
            f"{what} {path}: expected a state dict or a dict with a 'model' key, found "
            f"{type(checkpoint).__name__}"
        )
    return state


def load_state(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Model weights from a references-format checkpoint ({"model": ...}), a plain state dict,
    a .safetensors file or a qdistill packed file; nothing pickled is executed."""
    path = Path(path)
    _check_file(path, what)
    if is_tensor_file(path):
        from safetensors import SafetensorError

        from compressor.format.packed import PackedFormatError, load_packed

        try:
            return load_packed(path)[0]
        except PackedFormatError:
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except SafetensorError as exc:
                raise ModelError(f"{what} {path}: unreadable weights ({exc})") from None
    return state_of(read_checkpoint(path, what), path, what)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_weights_(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str | None = None
) -> nn.Module:
    """``model.load_state_dict(state)``, or a one-line :class:`ModelError` that says which
    tensors do not fit (rather than torch's list of every key)."""
    name = arch or type(model).__name__
    expected = model.state_dict()
    if any(".parametrizations." in k for k in state) and not any(
        ".parametrizations." in k for k in expected
    ):
        raise ModelError(
            f"{what} holds a quantized student's training state (shadow weights and "
            "quantizers), which loads only into the quantized model it was trained as: "
            "evaluate it with --test-only --resume, continue it with --resume, or give the "
            "run's packed student.qd here"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {name}'s tensors are missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not in {name} ({_few(unexpected)})")
        raise ModelError(
            f"{what} does not fit the architecture {name}: {'; '.join(parts)}; it was saved "
            "from another architecture (check --model/--teacher and --cifar-stem)"
        )
    for key, value in expected.items():
        shape = getattr(state[key], "shape", None)
        if shape is None:
            raise ModelError(f"{what}: {key} is a {type(state[key]).__name__}, not a tensor")
        if tuple(shape) != tuple(value.shape):
            raise ModelError(
                f"{what} does not fit the architecture {name}: {key} has shape "
                f"{tuple(shape)} there and {tuple(value.shape)} here (another number of "
                "classes, or another --cifar-stem setting?)"
            )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(
            f"{what} does not fit the architecture {name}: "
            f"{lines[1] if len(lines) > 1 else lines[0]}"
        ) from None
    return model


def build_teacher(
    name: str,
    num_classes: int,
    weights: str | None = None,
    checkpoint: str | None = None,
    cifar_stem: bool = False,
) -> nn.Module:
    """The teacher: pretrained through a torchvision weights enum name (resolved by
    torchvision and loaded through the torch hub cache), or from a checkpoint file."""
    import torchvision

    if name not in classification_models():
        raise ModelError(f"unknown teacher model {name!r}")
    if weights is not None:
        try:
            enum = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelError(f"--teacher-weights {weights!r}: {exc}") from None
        classes = len(enum.meta.get("categories") or [])
        if classes and classes != num_classes:
            raise ModelError(
                f"teacher weights {weights} predict {classes} classes, the data has "
                f"{num_classes}; fine-tune the teacher on this data first (--teacher-checkpoint)"
            )
        try:
            model = torchvision.models.get_model(name, weights=enum)
        except Exception as exc:  # no network here: the file must be in the hub cache
            raise ModelError(
                f"could not load {weights} ({str(exc).splitlines()[0]}); place the file in "
                f"{torch.hub.get_dir()}/checkpoints or use --teacher-checkpoint"
            ) from None
        return cifar_stem_(model) if cifar_stem else model
    model = build_model(name, num_classes, cifar_stem)
    if checkpoint is not None:
        state = load_state(checkpoint, "--teacher-checkpoint")
        head = [k for k in state if k.endswith(".weight")]
        quantized = any(".parametrizations." in k for k in state)
        if head and not quantized and hasattr(state[head[-1]], "shape"):
            outputs = state[head[-1]].shape[0]
            if outputs != num_classes:
                raise ModelError(
                    f"teacher checkpoint predicts {outputs} classes, the data has "
                    f"{num_classes}; fine-tune the teacher on this data first"
                )
        load_weights_(model, state, f"--teacher-checkpoint {checkpoint}", name)
    return model
