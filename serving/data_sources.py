"""Labelled data for calibration and evaluation, checked against the graph's input spec.

Three sources, one result (an :class:`abstain.datasets.ArraySplit`, x float32 ``[N, C, H, W]``
in [0, 1], y int64 ``[N]``):

* a dataset's split, the same files and split training used (:mod:`abstain.datasets`):
  ``--dataset digits|fashion-mnist|cifar100 --split val`` as arrays, or
  ``--dataset imagefolder --data-root D --split val`` (10 % of ``D/train`` per class; ``test``
  is ``D/val``), whose images are decoded here;
* an ``.npz`` file with arrays ``x`` and ``y`` (:func:`abstain.datasets.load_npz`);
* an ImageFolder directory ``root/<class>/<image>`` (torchvision's layout).

Arrays (built-in splits, ``.npz``) must already have the graph's shape: silently resizing
them would calibrate on different pixels than the client sends. Images are files, and are
converted exactly as a client's image upload would be (:func:`serving.validation.fit_image`:
for image-folder models, training's eval Resize + CenterCrop).

The fingerprint of ``--dataset imagefolder`` data is its file list's
(:func:`abstain.datasets.file_list_fingerprint`), the one training records, so calibration
recognises and refuses the training split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abstain.contract import InputSpec
from abstain.datasets import (
    ARRAY_DATASETS,
    ArraySplit,
    imagefolder_split,
    load_array_dataset,
    load_cifar100,
    load_npz,
)
from serving.inference import validate_pixels
from serving.validation import fit_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
#: What ``--dataset`` accepts for calibration and evaluation.
DATASETS = (*ARRAY_DATASETS, "cifar100", "imagefolder")


def image_to_pixels(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file → float32 ``[C, H, W]`` in [0, 1] for ``spec``, preprocessed by ``fit_image``."""
    from PIL import Image, UnidentifiedImageError

    if spec.channels not in (1, 3):
        raise ValueError(f"images can feed graphs with 1 or 3 channels, but this graph wants {spec.channels}")
    try:
        with Image.open(path) as image:
            return fit_image(image, spec)
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{path}: the image is too large to decode safely ({exc}); resize it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels or leave it out of the calibration data"
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def _decode_all(paths: Sequence[Path | str], spec: InputSpec) -> np.ndarray:
    """Image files → float32 ``[N, C, H, W]``, written into one array (no second copy to stack)."""
    x = np.empty((len(paths), *spec.shape), dtype=np.float32)
    for i, path in enumerate(paths):
        x[i] = image_to_pixels(Path(path), spec)
    return x


def load_imagefolder_split(root: Path, split: str, spec: InputSpec,
                           class_names: Sequence[str]) -> ArraySplit:
    """``--dataset imagefolder``: training's split of ``root`` (train/val carved from ``root/train``,
    test = ``root/val``), decoded for the graph, fingerprinted by its file list."""
    files = imagefolder_split(root, split)
    if tuple(class_names) != files.class_names:
        raise ValueError(
            f"{files.name} in {root}: the class folders {list(files.class_names)[:5]}... "
            f"({len(files.class_names)}) are not the graph's classes {list(class_names)[:5]}... "
            f"({len(class_names)}); calibrate a graph on the dataset it was trained on"
        )
    return ArraySplit(x=_decode_all(files.paths, spec), y=files.y, class_names=files.class_names,
                      name=files.name, source_fingerprint=files.fingerprint)


def load_dataset_split(name: str, split: str, spec: InputSpec, class_names: Sequence[str],
                       data_root: Path | None = None) -> ArraySplit:
    """``--dataset NAME --split SPLIT``: one of :data:`DATASETS`."""
    if name in ARRAY_DATASETS:
        return load_array_dataset(name, split, data_root)
    if name == "cifar100":
        return load_cifar100(split, data_root)
    if name == "imagefolder":
        if data_root is None:
            raise ValueError("dataset imagefolder needs --data-root (the folder holding train/ and val/)")
        return load_imagefolder_split(Path(data_root), split, spec, class_names)
    raise ValueError(f"dataset should be one of {', '.join(DATASETS)}, but got {name!r}")


def _class_index(folder: str, class_names: Sequence[str]) -> int:
    """A class folder's label: its position in the graph's class names, or its integer name."""
    if folder in class_names:
        return list(class_names).index(folder)
    if folder.isdigit():
        return int(folder)  # range checked with the other labels
    raise ValueError(
        f"image folder class {folder!r} is neither one of the graph's class names "
        f"{list(class_names)} nor a class index"
    )


def load_image_folder(root: Path, spec: InputSpec, class_names: Sequence[str]) -> ArraySplit:
    """``root/<class>/<image>`` → arrays; ``<class>`` is a class name of the graph or an index."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: an image folder should hold one sub-directory per class, but has none")
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        label = _class_index(folder.name, class_names)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ArraySplit(x=_decode_all(paths, spec), y=np.asarray(labels, dtype=np.int64),
                      class_names=tuple(class_names), name=str(root))


def load_labelled_data(spec: InputSpec, class_names: Sequence[str], *, dataset: str | None = None,
                       split: str = "val", data: Path | None = None,
                       data_root: Path | None = None) -> ArraySplit:
    """Load one source (``dataset``+``split`` or ``data`` path) and check it against the graph.

    Raises ``ValueError`` for: no or two sources, a shape other than the graph's
    ``[N, C, H, W]``, NaN/Inf or pixels outside [0, 1], labels outside ``[0, K)``.
    """
    if (dataset is None) == (data is None):
        raise ValueError(
            "give exactly one data source: --dataset NAME --split SPLIT, or --data PATH "
            "(an .npz file with x and y, or an ImageFolder directory)"
        )
    if dataset is not None:
        split_data = load_dataset_split(dataset, split, spec, class_names, data_root)
    else:
        path = Path(data)  # type: ignore[arg-type]
        if path.is_dir():
            split_data = load_image_folder(path, spec, class_names)
        elif path.suffix == ".npz" or path.is_file():
            split_data = load_npz(path, class_names)
        else:
            raise FileNotFoundError(f"{path}: no such .npz file or image directory")
    x = validate_pixels(split_data.x, spec)  # shape, NaN/Inf, range: same checks as serving
    y = split_data.y
    k = len(class_names)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= k):
        bad = sorted({int(v) for v in y[(y < 0) | (y >= k)]})[:5]
        raise ValueError(
            f"{split_data.name}: labels should be class indices in [0, {k}) for this graph's "
            f"{k} classes, but got {bad}"
        )
    return ArraySplit(x=x, y=y, class_names=tuple(class_names), name=split_data.name,
                      source_fingerprint=split_data.source_fingerprint)
