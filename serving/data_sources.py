"""Labelled data for calibration and evaluation, checked against the graph's input spec.

Three sources, one result (an :class:`abstain.datasets.ArraySplit`, x float32 ``[N, C, H, W]``
in [0, 1], y int64 ``[N]``):

* a built-in split: ``--dataset digits --split val`` (:mod:`abstain.datasets`);
* an ``.npz`` file with arrays ``x`` and ``y`` (:func:`abstain.datasets.load_npz`);
* an ImageFolder directory ``root/<class>/<image>`` (torchvision's layout) read with PIL,
  converted to the graph's channels (``L`` or ``RGB``) and resized to its height × width.

Arrays (built-in splits, ``.npz``) must already have the graph's shape: silently resizing
them would calibrate on different pixels than the client sends. Images are files, and are
converted exactly as a client's image upload would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abstain.contract import InputSpec
from abstain.datasets import ArraySplit, load_array_dataset, load_npz
from serving.inference import validate_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def image_to_pixels(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file → float32 ``[C, H, W]`` in [0, 1] for ``spec`` (grey ``L`` or ``RGB``)."""
    from PIL import Image, UnidentifiedImageError

    if spec.channels not in (1, 3):
        raise ValueError(f"images can feed graphs with 1 or 3 channels, but this graph wants {spec.channels}")
    try:
        with Image.open(path) as image:
            image = image.convert("L" if spec.channels == 1 else "RGB")
            if image.size != (spec.width, spec.height):
                image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc
    return array[None] if spec.channels == 1 else array.transpose(2, 0, 1)


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
    images: list[np.ndarray] = []
    labels: list[int] = []
    for folder in folders:
        label = _class_index(folder.name, class_names)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(image_to_pixels(path, spec))
                labels.append(label)
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ArraySplit(x=np.stack(images), y=np.asarray(labels, dtype=np.int64),
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
        split_data = load_array_dataset(dataset, split, data_root)
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
    return ArraySplit(x=x, y=y, class_names=tuple(class_names), name=split_data.name)
