"""Torch datasets for training: train / val / test splits plus what the checkpoint records.

* ``digits``, ``fashion-mnist``: the fixed array splits of :mod:`abstain.datasets` (the same
  ones calibration reads), wrapped as tensors. ``fashion-mnist`` with ``download=True`` and no
  local files fetches the IDX files through torchvision's ``FashionMNIST`` into ``data_root``
  first (only then, and only when asked).
* ``cifar100``: torchvision's ``CIFAR100`` from ``data_root`` (``cifar-100-python/``); val is
  5,000 images carved from train per class with :data:`abstain.datasets.SPLIT_SEED`; test is
  the official test set. Training augmentation: random crop with padding 4 and horizontal
  flip, the usual CIFAR recipe. SelectiveNet's Keras reference differs: ``ImageDataGenerator``
  with rotations of up to 15°, shifts of up to 10 % (3 pixels) and horizontal flips; a crop
  with padding 4 is a shift of up to 4 pixels without the rotation. Not compared here (the
  Fashion-MNIST benchmarks use no augmentation at all).
* ``imagefolder``: ImageNet-100 / Stanford Cars as ``data_root/train/<class>/*`` and
  ``data_root/val/<class>/*``. val (for calibration) is 10 % of ``train/`` carved per class
  with the fixed seed; test is ``val/``. Training: RandomResizedCrop(224) + flip; eval:
  Resize(256) + CenterCrop(224).

Data fingerprint (stored in the checkpoint, compared by calibration): for array datasets
and CIFAR-100, :func:`abstain.datasets.fingerprint` of the training split's float32 pixels
``[N, C, H, W]`` and labels — so an ``.npz`` of the same split is recognised; for
``imagefolder``, :func:`abstain.datasets.file_list_fingerprint`: a sha256 over the sorted
(relative path, size in bytes) of the training files (reading every image would take minutes
on ImageNet-100). The split of ``train/`` into train and val files is
:func:`abstain.datasets.imagefolder_split`, shared with calibration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from abstain.contract import InputSpec
from abstain.datasets import (
    CIFAR100_VAL_FRACTION,
    SPLIT_SEED,
    ArraySplit,
    fashion_mnist_root,
    imagefolder_resize_size,
    imagefolder_split,
    load_array_dataset,
    stratified_split_indices,
)
from abstain.training.defaults import DATASETS  # the CLI reads the same tuple

#: Per-channel statistics baked into the model (raw [0, 1] pixels in, normalised inside).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEFOLDER_CROP = 224


@dataclass
class DataBundle:
    """Everything the loop needs from a dataset.

    Attributes:
        train, val, test: datasets yielding ``(x float32 [C, H, W] in [0, 1], y int64)``.
        class_names: ``K`` names.
        input_spec: what the model takes (mean/std are the normalisation baked into it).
        fingerprint: of the training split (see the module docstring).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: tuple[str, ...]
    input_spec: InputSpec
    fingerprint: str


def _tensors(split: ArraySplit) -> TensorDataset:
    return TensorDataset(torch.from_numpy(split.x), torch.from_numpy(split.y))


def load_arrays_bundle(name: str, data_root: Path | None = None, download: bool = False) -> DataBundle:
    """``digits`` or ``fashion-mnist`` from :mod:`abstain.datasets` (the calibration splits too)."""
    if name == "fashion-mnist" and download:
        if data_root is None:
            raise ValueError("--download needs --data-root: the folder to download Fashion-MNIST into")
        try:
            fashion_mnist_root(data_root)
        except FileNotFoundError:
            _download_fashion_mnist(data_root)
    splits = {s: load_array_dataset(name, s, data_root) for s in ("train", "val", "test")}
    train = splits["train"]
    c, h, w = train.x.shape[1:]
    # Dataset statistics, rounded so the model config stays readable; per channel.
    mean = tuple(round(float(v), 4) for v in train.x.mean(axis=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in train.x.std(axis=(0, 2, 3)))
    return DataBundle(
        name=name,
        train=_tensors(train),
        val=_tensors(splits["val"]),
        test=_tensors(splits["test"]),
        class_names=train.class_names,
        input_spec=InputSpec(int(c), int(h), int(w), mean, std),
        fingerprint=train.fingerprint,
    )


def _download_fashion_mnist(root: Path) -> None:
    """Fetch the IDX files with torchvision (only when the user passed ``--download``)."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)  # writes root/FashionMNIST/raw/*


def streaming_fingerprint(images_hwc_uint8: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> str:
    """:func:`abstain.datasets.fingerprint` of ``images / 255`` as ``[N, C, H, W]`` float32, in chunks.

    The same bytes in the same order as converting the whole array at once (C order over N),
    without holding a float copy of the whole split (550 MB for CIFAR-100's train).
    """
    n, h, w, c = images_hwc_uint8.shape
    digest = hashlib.sha256()
    digest.update(repr((n, c, h, w)).encode())
    for start in range(0, n, chunk):
        block = images_hwc_uint8[start : start + chunk].astype(np.float32) / np.float32(255.0)
        digest.update(np.ascontiguousarray(block.transpose(0, 3, 1, 2)).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return "sha256:" + digest.hexdigest()


def load_cifar100(root: Path, download: bool = False) -> DataBundle:
    """CIFAR-100 from ``root/cifar-100-python/{train,test,meta}`` (torchvision's python pickles)."""
    from torchvision import datasets, transforms

    root = Path(root)
    layout = (
        f"expected torchvision's CIFAR-100 layout {root}/cifar-100-python/ with files "
        "train, test and meta (the python version, cifar-100-python.tar.gz, extracted)"
    )
    if not download and not (root / "cifar-100-python").is_dir():
        raise FileNotFoundError(f"CIFAR-100 not found in {root}: {layout}; or pass --download")
    augment = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    plain = transforms.ToTensor()
    try:
        train_aug = datasets.CIFAR100(str(root), train=True, transform=augment, download=download)
        train_plain = datasets.CIFAR100(str(root), train=True, transform=plain, download=False)
        test = datasets.CIFAR100(str(root), train=False, transform=plain, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
        raise ValueError(f"CIFAR-100 in {root} is incomplete or corrupted ({exc}): {layout}") from exc
    targets = np.asarray(train_aug.targets, dtype=np.int64)
    train_idx, val_idx = stratified_split_indices(
        targets, (1 - CIFAR100_VAL_FRACTION, CIFAR100_VAL_FRACTION), SPLIT_SEED
    )
    return DataBundle(
        name="cifar100",
        train=Subset(train_aug, train_idx.tolist()),
        val=Subset(train_plain, val_idx.tolist()),
        test=test,
        class_names=tuple(train_aug.classes),
        input_spec=InputSpec(3, 32, 32, CIFAR100_MEAN, CIFAR100_STD),
        fingerprint=streaming_fingerprint(train_aug.data[train_idx], targets[train_idx]),
    )


def load_imagefolder(root: Path, crop: int = IMAGEFOLDER_CROP) -> DataBundle:
    """ImageNet-100 / Stanford Cars as ImageFolder: ``root/train/<class>/*``, ``root/val/<class>/*``."""
    from torchvision import datasets, transforms

    root = Path(root)
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> "
        "with the same class folders in both (torchvision ImageFolder layout)"
    )
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"image folder dataset: {root / part} does not exist; {layout}")
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(crop),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    # Eval preprocessing: the policy serving applies to uploads and calibration images
    # (abstain.images.fit_image, PIL's bilinear resize — what torchvision calls on PIL images).
    plain = transforms.Compose(
        [
            transforms.Resize(imagefolder_resize_size(crop)),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
        ]
    )
    try:
        train_aug = datasets.ImageFolder(str(root / "train"), transform=augment)
        train_plain = datasets.ImageFolder(str(root / "train"), transform=plain)
        test = datasets.ImageFolder(str(root / "val"), transform=plain)
    except FileNotFoundError as exc:  # ImageFolder: no class folders / no valid image files
        raise FileNotFoundError(f"image folder dataset in {root}: {exc}; {layout}") from exc
    if test.classes != train_aug.classes:
        raise ValueError(
            f"image folder dataset in {root}: train/ has classes {train_aug.classes[:5]}... "
            f"({len(train_aug.classes)}) but val/ has {test.classes[:5]}... ({len(test.classes)}); {layout}"
        )
    # Which files of train/ are train and which are val: abstain.datasets decides (the same
    # function calibration uses), and we take ImageFolder's indices of exactly those files.
    train_split, val_split = imagefolder_split(root, "train"), imagefolder_split(root, "val")
    position = {path: i for i, (path, _) in enumerate(train_aug.samples)}
    try:
        train_idx = [position[path] for path in train_split.paths]
        val_idx = [position[path] for path in val_split.paths]
    except KeyError as exc:  # only if torchvision's ImageFolder changed how it lists files
        raise RuntimeError(f"ImageFolder and abstain.datasets list {root}/train differently: {exc}") from exc
    return DataBundle(
        name="imagefolder",
        train=Subset(train_aug, train_idx),
        val=Subset(train_plain, val_idx),
        test=test,
        class_names=tuple(train_aug.classes),
        input_spec=InputSpec(3, crop, crop, IMAGENET_MEAN, IMAGENET_STD),
        fingerprint=train_split.fingerprint,
    )


def subset_train(bundle: DataBundle, n: int) -> DataBundle:
    """``bundle`` with only ``n`` training samples: the first ``n`` of a fixed shuffle (``SPLIT_SEED``).

    For quick experiments (the quality benchmark's reduced setting); val and test are untouched.
    """
    # the [arg-type] ignore: torch's Dataset declares no __len__; a DataBundle's splits all have one
    total = len(bundle.train)  # type: ignore[arg-type]
    if not 1 <= n <= total:
        raise ValueError(f"train_subset should be in [1, {total}] (the training split's size), but got {n}")
    order = np.random.default_rng(SPLIT_SEED).permutation(total)[:n]
    return replace(bundle, train=Subset(bundle.train, np.sort(order).tolist()))


def load_data(name: str, data_root: Path | None = None, download: bool = False) -> DataBundle:
    """The :class:`DataBundle` of dataset ``name`` (one of :data:`DATASETS`)."""
    if name in ("digits", "fashion-mnist"):
        return load_arrays_bundle(name, data_root, download)
    if name in ("cifar100", "imagefolder"):
        if data_root is None:
            raise ValueError(f"dataset {name} needs --data-root (the folder that holds it)")
        return load_cifar100(data_root, download) if name == "cifar100" else load_imagefolder(data_root)
    raise ValueError(f"dataset should be one of {', '.join(DATASETS)}, but got {name!r}")


class IndexedDataset(Dataset):
    """``dataset`` with each sample's position appended: ``(x, y, index)``, index an int.

    For losses that keep per-sample state across epochs (SAT's EMA targets,
    :class:`abstain.training.losses.SelfAdaptiveTrainingLoss`); the loader's default collate
    turns the indices into an int64 ``[B]`` tensor.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # every DataBundle split has a length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.dataset[index]
        return x, y, index
