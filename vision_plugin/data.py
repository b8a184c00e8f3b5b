"""Data sets for the vision plugin: CIFAR-10 (npz files or torchvision's folder layout) and
ImageFolder ``train/``/``val/`` trees, with the references' standard augmentations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


CIFAR10_CLASSES = 10


class DataError(ValueError):
    """A missing or malformed data set (reported as one line)."""


def interpolation_modes() -> list[str]:
    from torchvision.transforms import InterpolationMode

    return [mode.value for mode in InterpolationMode]


def check_labels(labels: np.ndarray, num_classes: int, where: object) -> None:
    """Every label a class number from 0 to ``num_classes - 1``: checked once when the data is
    loaded, rather than an IndexError in the middle of an epoch."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, found {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{where}: labels must be class numbers 0 to {num_classes - 1}; found {len(bad)} "
            f"outside that range (first: label {int(labels[bad[0]])} at index {int(bad[0])}); "
            "fix the labels, or give the data as an ImageFolder tree"
        )


def default_data_path() -> Path:
    shared = Path(
        os.environ.get("QDISTILL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    return shared / "cifar10"


def detect_dataset(root: Path) -> str:
    """ "cifar10" for the npz files or torchvision's ``cifar-10-batches-py`` layout,
    "imagefolder" for ``train/``/``val/`` trees."""
    if (root / "train.npz").is_file() or (root / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return "imagefolder"
    raise DataError(
        f"{root}: no data set found: expected CIFAR-10 (train.npz/test.npz or "
        f"cifar-10-batches-py/) or an ImageFolder tree (train/ and val/)"
    )


class ArrayDataset(Dataset):
    """In-memory uint8 NHWC images with labels, and a transform applied to PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, H, W, 3 uint8) and labels of one CIFAR-10 npz file, checked; a
    :class:`DataError` says what is wrong with a file that is not one."""
    try:
        with np.load(path) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"{path}: not a CIFAR-10 npz file with 'images' and 'labels' ({exc})"
        ) from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: 'labels' must be one class number per image (integers), found "
            f"{labels.dtype} of shape {labels.shape}"
        )
    if (
        images.ndim != 4
        or images.shape[-1] != 3
        or images.dtype != np.uint8
        or len(images) != len(labels)
    ):
        raise DataError(f"{path}: expected uint8 NHWC RGB images and one label per image")
    labels = labels.astype(np.int64)
    check_labels(labels, CIFAR10_CLASSES, path)
    return images, labels


def _load_cifar_batches(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(folder), train=train, download=False)
    except RuntimeError as exc:
        raise DataError(f"{folder}: malformed CIFAR-10 folder ({exc})") from None
    labels = np.asarray(ds.targets, dtype=np.int64)
    check_labels(labels, CIFAR10_CLASSES, folder / "cifar-10-batches-py")
    return np.asarray(ds.data), labels


def _subset(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int):
    """A fixed random subset (the npz files are sorted by class)."""
    if limit is None or limit >= len(labels):
        return images, labels
    chosen = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
    return images[chosen], labels[chosen]


def transforms_for(dataset: str, args) -> tuple:
    """Training and evaluation transforms, as the classification references build them."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if args.interpolation not in interpolation_modes():
        raise DataError(
            f"--interpolation {args.interpolation!r} is not a mode; choose one of "
            f"{', '.join(interpolation_modes())}"
        )
    interpolation = InterpolationMode(args.interpolation)
    if dataset == "cifar10":
        normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        crop = args.train_crop_size if args.train_crop_size != 224 else 32
        train = T.Compose(
            [T.RandomCrop(crop, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        val = T.Compose([T.ToTensor(), normalize])
        return train, val
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose(
        [
            T.RandomResizedCrop(args.train_crop_size, interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    val = T.Compose(
        [
            T.Resize(args.val_resize_size, interpolation=interpolation),
            T.CenterCrop(args.val_crop_size),
            T.ToTensor(),
            normalize,
        ]
    )
    return train, val


def load_data(args) -> tuple[Dataset, Dataset, int]:
    """Training and validation sets and the number of classes, from ``args.data_path``."""
    root = Path(args.data_path) if args.data_path else default_data_path()
    if not root.exists():
        raise DataError(f"--data-path {root} does not exist (or set QDISTILL_DATA)")
    dataset = detect_dataset(root) if args.dataset == "auto" else args.dataset
    train_tf, val_tf = transforms_for(dataset, args)
    if dataset == "cifar10":
        if (root / "train.npz").is_file():
            if not (root / "test.npz").is_file():
                raise DataError(f"{root}: train.npz found but test.npz is missing")
            train = load_npz(root / "train.npz")
            val = load_npz(root / "test.npz")
        elif (root / "cifar-10-batches-py").is_dir():
            train = _load_cifar_batches(root, True)
            val = _load_cifar_batches(root, False)
        else:
            raise DataError(
                f"{root}: no CIFAR-10 data (train.npz/test.npz or cifar-10-batches-py/)"
            )
        train = _subset(*train, args.max_train_samples, args.seed)
        val = _subset(*val, args.max_val_samples, args.seed)
        return (
            ArrayDataset(*train, train_tf),
            ArrayDataset(*val, val_tf),
            CIFAR10_CLASSES,
        )
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: ImageFolder data needs {split}/ with one folder per class")
    try:
        train_set = ImageFolder(str(root / "train"), train_tf)
        val_set = ImageFolder(str(root / "val"), val_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root}: malformed ImageFolder tree ({exc})") from None
    if train_set.classes != val_set.classes:
        raise DataError(f"{root}: train/ and val/ have different classes")
    train_set = _limit(train_set, args.max_train_samples, args.seed)
    val_set = _limit(val_set, args.max_val_samples, args.seed)
    return (
        train_set,
        val_set,
        len(val_set.dataset.classes if hasattr(val_set, "dataset") else val_set.classes),
    )


def _limit(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    chosen = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return torch.utils.data.Subset(dataset, chosen.tolist())
