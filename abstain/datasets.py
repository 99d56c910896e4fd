"""Array-level datasets shared by training and calibration (numpy only, no torch).

Every loader returns an :class:`ArraySplit`: ``x`` float32 ``[N, C, H, W]`` in [0, 1] and
``y`` int64 ``[N]``, with class names and a content fingerprint. The splits are fixed:

* ``digits`` — scikit-learn's 1,797 8×8 digits (ship with scikit-learn, no download),
  split per class with a fixed seed into train 60 % / val 20 % / test 20 %.
* ``fashion-mnist`` — the real 70,000 28×28 Fashion-MNIST images from IDX files
  (Debian's ``dataset-fashion-mnist`` or ``--data-root``): the official 10,000 test
  images are ``test``; the 60,000 training images are split per class with a fixed seed
  into train 55,000 / val 5,000.

* ``cifar100`` — torchvision's python pickles ``cifar-100-python/{train,test,meta}`` under
  ``--data-root``: ``test`` is the official test set; 10 % of each class of the training
  images is ``val`` (the split training carves, same seed).
* ``imagefolder`` — ImageNet-100 / Stanford Cars as ``root/train/<class>/*`` and
  ``root/val/<class>/*``: :func:`imagefolder_split` lists the *files* of each split (10 % of
  each class of ``train/`` is ``val``; ``test`` is ``val/``); images are decoded by the caller
  (torchvision in training, PIL in serving). Its fingerprint is
  :func:`file_list_fingerprint`, not a hash of pixels.

``val`` is for calibration, ``test`` for evaluation; the three never overlap.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
ARRAY_DATASETS = ("digits", "fashion-mnist")
SPLIT_SEED = 20260211  # fixed forever: changing it changes every split and fingerprint

DIGITS_CLASS_NAMES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class ArraySplit:
    """One split of a dataset as arrays.

    Attributes:
        x: float32 ``[N, C, H, W]`` raw pixels in [0, 1].
        y: int64 ``[N]`` class indices in ``[0, K)``.
        class_names: ``K`` names, index ``i`` names class ``i``.
        name: e.g. ``"digits/val"``.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    name: str
    #: When set, the fingerprint of where the pixels came from (an image folder's file list,
    #: see :func:`file_list_fingerprint`) instead of a hash of the decoded pixels.
    source_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"x should be [N, C, H, W], but got shape {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y should be [N] with N = {self.x.shape[0]}, but got shape {self.y.shape}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def fingerprint(self) -> str:
        """``source_fingerprint`` if set, else :func:`fingerprint` of the pixels and labels."""
        return self.source_fingerprint or fingerprint(self.x, self.y)


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 over the float32 pixels and int64 labels (shape included): same data, same id."""
    digest = hashlib.sha256()
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    y64 = np.ascontiguousarray(y, dtype=np.int64)
    digest.update(repr(x32.shape).encode())
    digest.update(x32.tobytes())
    digest.update(y64.tobytes())
    return "sha256:" + digest.hexdigest()


def stratified_split_indices(
    y: np.ndarray, fractions: Sequence[float], seed: int = SPLIT_SEED
) -> list[np.ndarray]:
    """Split ``range(len(y))`` per class into parts of the given fractions (the last takes the rest).

    Each class is shuffled with ``seed`` and cut so that part ``i`` gets
    ``round(fractions[i] * n_class)`` of it; parts are returned sorted and never overlap.
    """
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions should sum to 1, but got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        members = members[rng.permutation(len(members))]
        start = 0
        for i, frac in enumerate(fractions):
            stop = len(members) if i == len(fractions) - 1 else start + round(frac * len(members))
            parts[i].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split should be one of {', '.join(SPLITS)}, but got {split!r}")


def load_digits(split: str) -> ArraySplit:
    """scikit-learn's digits as ``[N, 1, 8, 8]`` in [0, 1] (pixel values 0-16 divided by 16)."""
    _check_split(split)
    from sklearn.datasets import load_digits as sk_load_digits  # lazily: only digits needs it

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, val, test = stratified_split_indices(y, (0.6, 0.2, 0.2))
    idx = {"train": train, "val": val, "test": test}[split]
    return ArraySplit(x=x[idx], y=y[idx], class_names=DIGITS_CLASS_NAMES, name=f"digits/{split}")


def _find_idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (
        root / stem,
        root / f"{stem}.gz",
        root / "FashionMNIST" / "raw" / stem,
        root / "FashionMNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension. Raises ``ValueError`` on anything else.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX uint8 file (expected magic 00 00 08 nd)")
    ndim = data[3]
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    body = np.frombuffer(data, dtype=np.uint8, offset=header_end)
    if body.size != expected:
        raise ValueError(f"{path}: IDX header says {dims} = {expected} values but the file holds {body.size}")
    return body.reshape(dims)


def fashion_mnist_root(data_root: Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's four IDX files, or a ``FileNotFoundError`` naming it."""
    roots = [Path(data_root)] if data_root is not None else [DEBIAN_FASHION_MNIST_DIR]
    for root in roots:
        if all(_find_idx_file(root, stem) for pair in FASHION_MNIST_FILES.values() for stem in pair):
            return root
    where = roots[0]
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {where}: expected the IDX files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (optionally .gz, or under FashionMNIST/raw/). "
        "Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "pass --data-root, or use --download where there is internet."
    )


def load_fashion_mnist(split: str, data_root: Path | None = None) -> ArraySplit:
    """Fashion-MNIST as ``[N, 1, 28, 28]`` in [0, 1]."""
    _check_split(split)
    root = fashion_mnist_root(data_root)
    source = "test" if split == "test" else "train"
    image_stem, label_stem = FASHION_MNIST_FILES[source]
    image_path, label_path = _find_idx_file(root, image_stem), _find_idx_file(root, label_stem)
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise FileNotFoundError(f"Fashion-MNIST in {root} lacks the IDX file {missing} (optionally .gz)")
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST in {root}: expected images [N, 28, 28] and labels [N], "
            f"but got {images.shape} and {labels.shape}"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASS_NAMES):
        raise ValueError(f"Fashion-MNIST in {root}: label {int(labels.max())} out of range 0-9")
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    y = labels.astype(np.int64)
    if source == "train":
        # 55,000 / 5,000 of 60,000: 1/12 of each class goes to val.
        train_idx, val_idx = stratified_split_indices(y, (11 / 12, 1 / 12))
        idx = train_idx if split == "train" else val_idx
        x, y = x[idx], y[idx]
    return ArraySplit(x=x, y=y, class_names=FASHION_MNIST_CLASS_NAMES, name=f"fashion-mnist/{split}")


CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_VAL_FRACTION = 0.1  # 5,000 of the 50,000 training images


def _unpickle(path: Path) -> dict:
    # The python version of CIFAR-100 is pickled dicts; torchvision reads it the same way. Only
    # load a --data-root you trust (unpickling runs code), as with torchvision's CIFAR100.
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read CIFAR-100 file ({exc})") from exc


def load_cifar100(split: str, data_root: Path | None) -> ArraySplit:
    """CIFAR-100 as ``[N, 3, 32, 32]`` in [0, 1], with training's carved ``val`` split.

    The same images, order and split as ``abstain.training.data.load_cifar100`` (torchvision), so the
    ``train`` split's fingerprint is the one the checkpoint records.
    """
    _check_split(split)
    if data_root is None:
        raise ValueError("dataset cifar100 needs --data-root (the folder that holds cifar-100-python/)")
    folder = Path(data_root) / CIFAR100_FOLDER
    names = ("train", "test", "meta")
    if not all((folder / n).is_file() for n in names):
        raise FileNotFoundError(
            f"CIFAR-100 not found in {data_root}: expected torchvision's layout {folder}/ with files "
            "train, test and meta (the python version, cifar-100-python.tar.gz, extracted)"
        )
    entry = _unpickle(folder / ("test" if split == "test" else "train"))
    meta = _unpickle(folder / "meta")
    try:
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows: R, G, B planes
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        class_names = tuple(str(n) for n in meta["fine_label_names"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"CIFAR-100 in {folder} is incomplete or corrupted ({exc!r})") from exc
    if split != "test":
        train_idx, val_idx = stratified_split_indices(
            labels, (1 - CIFAR100_VAL_FRACTION, CIFAR100_VAL_FRACTION)
        )
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    x = images.astype(np.float32) / np.float32(255.0)  # the division training's fingerprint uses
    return ArraySplit(x=x, y=labels, class_names=class_names, name=f"cifar100/{split}")


# --- image folders (file lists; decoding is the caller's) -------------------------------
#: torchvision's ``IMG_EXTENSIONS``: the files ``ImageFolder`` takes.
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGEFOLDER_VAL_FRACTION = 0.1  # of each class of train/
#: Eval preprocessing of image-folder models: shorter side to ``round(size * 256 / 224)``,
#: then a centre crop of ``size`` (ImageNet's Resize(256) + CenterCrop(224) at size 224).
IMAGEFOLDER_RESIZE_RATIO = 256 / 224


def imagefolder_resize_size(crop: int) -> int:
    """The shorter side an image is resized to before a centre crop of ``crop`` (256 for 224)."""
    return round(crop * IMAGEFOLDER_RESIZE_RATIO)


@dataclass(frozen=True)
class FileSplit:
    """One split of an image-folder dataset as files.

    Attributes:
        root: the dataset folder holding ``train/`` and ``val/``.
        paths: image files, in ``torchvision.datasets.ImageFolder``'s order.
        y: int64 ``[N]`` class indices (position of the class folder in sorted order).
        class_names: the class folder names, sorted.
        name: e.g. ``"imagefolder/val"``.
    """

    root: Path
    paths: tuple[str, ...]
    y: np.ndarray
    class_names: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        return file_list_fingerprint(self.root, self.paths)


def file_list_fingerprint(root: Path, paths: Iterable[str]) -> str:
    """sha256 over the sorted (path relative to ``root``, size in bytes) of ``paths``.

    What training records for ``imagefolder`` (hashing the pixels of ImageNet-100 would take
    minutes); calibration computes it over its files to refuse the training split.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        p = Path(path)
        digest.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n".encode())
    return "sha256:" + digest.hexdigest()


def scan_image_folder(directory: str | os.PathLike[str]) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """``(class names, [(path, class index), ...])`` exactly as torchvision's ``ImageFolder`` lists them.

    Classes: the sorted sub-directories. Files: ``os.walk`` of each class folder (sorted,
    following links) keeping names that end in :data:`IMAGEFOLDER_EXTENSIONS`. Raises
    ``FileNotFoundError`` when there is no class folder or a class has no image.
    """
    directory = str(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        before = len(samples)
        for folder, _, fnames in sorted(os.walk(os.path.join(directory, name), followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(folder, fname)
                if path.lower().endswith(IMAGEFOLDER_EXTENSIONS):
                    samples.append((path, index))
        if len(samples) == before:
            empty.append(name)
    if empty:
        raise FileNotFoundError(
            f"Found no valid file for the classes {', '.join(empty)}. "
            f"Supported extensions are: {', '.join(IMAGEFOLDER_EXTENSIONS)}"
        )
    return tuple(classes), samples


def imagefolder_split_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``train/``'s files of the train and val splits (10 % of each class to val)."""
    train_idx, val_idx = stratified_split_indices(
        y, (1 - IMAGEFOLDER_VAL_FRACTION, IMAGEFOLDER_VAL_FRACTION), SPLIT_SEED
    )
    return train_idx, val_idx


def imagefolder_split(root: Path, split: str) -> FileSplit:
    """The files of ``split`` of the image-folder dataset in ``root`` (see the module docstring).

    ``train`` and ``val`` are carved from ``root/train`` per class with :data:`SPLIT_SEED`;
    ``test`` is ``root/val``. Training uses the same files (``abstain.training.data.load_imagefolder``).
    """
    _check_split(split)
    root = Path(root)
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> "
        "with the same class folders in both (torchvision ImageFolder layout)"
    )
    part = "val" if split == "test" else "train"
    try:
        classes, samples = scan_image_folder(root / part)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"image folder dataset in {root}: {exc}; {layout}") from exc
    paths = [p for p, _ in samples]
    y = np.asarray([c for _, c in samples], dtype=np.int64)
    if split != "test":
        idx = imagefolder_split_indices(y)[0 if split == "train" else 1]
        paths, y = [paths[i] for i in idx], y[idx]
    return FileSplit(root=root, paths=tuple(paths), y=y, class_names=classes, name=f"imagefolder/{split}")


def load_array_dataset(name: str, split: str, data_root: Path | None = None) -> ArraySplit:
    """One of :data:`ARRAY_DATASETS` by name."""
    if name == "digits":
        return load_digits(split)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_root)
    raise ValueError(f"dataset should be one of {', '.join(ARRAY_DATASETS)}, but got {name!r}")


def load_npz(path: Path, class_names: Sequence[str] | None = None) -> ArraySplit:
    """An ``.npz`` with arrays ``x`` (float ``[N, C, H, W]`` in [0, 1]) and ``y`` (int ``[N]``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # BadZipFile, pickle refusal, truncated file...
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive with arrays 'x' and 'y', got one array")
    with archive:
        if "x" not in archive.files or "y" not in archive.files:
            held = sorted(archive.files)
            raise ValueError(
                f"{path}: an .npz for abstain should hold arrays 'x' [N, C, H, W] and 'y' [N], "
                f"but it holds {held}"
            )
        x, y = archive["x"], archive["y"]
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: x should be floating point in [0, 1], but got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y should be integer class indices, but got dtype {y.dtype}")
    k = int(y.max()) + 1 if y.size else 0
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(k))
    return ArraySplit(
        x=x.astype(np.float32, copy=False),
        y=y.astype(np.int64, copy=False),
        class_names=names,
        name=str(path),
    )
