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
converted exactly as a client's image upload would be (:func:`abstain.images.fit_image`:
for image-folder models, training's eval Resize + CenterCrop).

The fingerprint of ``--dataset imagefolder`` data is its file list's
(:func:`abstain.datasets.file_list_fingerprint`), the one training records, so calibration
recognises and refuses the training split.

Calibration and evaluation use :func:`open_labelled_data`, a :class:`LabelledSource` whose
pixels come in batches (:meth:`LabelledSource.iter_batches`): image files are decoded
``batch_size`` at a time, so an ImageNet-sized split never sits in memory as one array
(13,000 images at 224×224 would be 7.8 GB). :func:`load_labelled_data` is the same source
materialised as an :class:`~abstain.datasets.ArraySplit`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

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
from abstain.images import fit_image
from abstain.runtime import validate_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
#: What ``--dataset`` accepts for calibration and evaluation.
DATASETS = (*ARRAY_DATASETS, "cifar100", "imagefolder")


def image_to_pixels(path: Path | IO[bytes], spec: InputSpec, name: str | None = None) -> np.ndarray:
    """One image file (a path, or its bytes as a binary file object) → float32 ``[C, H, W]`` in
    [0, 1] for ``spec``, preprocessed by ``fit_image``; ``name`` names it in errors (default: the path)."""
    from PIL import Image, UnidentifiedImageError

    name = str(path) if name is None else name

    if spec.channels not in (1, 3):
        raise ValueError(f"images can feed graphs with 1 or 3 channels, but this graph wants {spec.channels}")
    try:
        with Image.open(path) as image:
            return fit_image(image, spec)
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{name}: the image is too large to decode safely ({exc}); resize it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels or leave it out of the calibration data"
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        detail = str(exc) if isinstance(path, (str, Path)) else str(exc).replace(repr(path), "").strip()
        raise ValueError(f"{name}: not a readable image ({detail})") from exc


class LabelledSource:
    """Labelled data checked against the graph: labels and names in memory, pixels in batches.

    Attributes:
        y: int64 ``[N]`` class indices in ``[0, K)``.
        class_names: the graph's ``K`` class names.
        name: where the data came from, e.g. ``"imagefolder/val"``.
    """

    y: np.ndarray
    class_names: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Float32 ``[b, C, H, W]`` pixel batches, ``b <= batch_size``, in the order of ``y``,
        each checked by :func:`abstain.runtime.validate_pixels`."""
        raise NotImplementedError

    @property
    def known_fingerprint(self) -> str | None:
        """The fingerprint if it needs no pass over the pixels (else ``None``)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Same value as :attr:`abstain.datasets.ArraySplit.fingerprint` of this data."""
        raise NotImplementedError

    def materialise(self) -> ArraySplit:
        """All pixels as one array (what streaming avoids; for small data and tests)."""
        raise NotImplementedError


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch size should be at least 1, but got {batch_size!r}")


class ArraySource(LabelledSource):
    """Data already in memory as an array (built-in array datasets, ``.npz``): batches are views."""

    def __init__(self, split: ArraySplit) -> None:
        self.split = split
        self.y, self.class_names, self.name = split.y, tuple(split.class_names), split.name

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        _check_batch_size(batch_size)
        x = self.split.x  # validated whole by open_labelled_data
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size]

    @property
    def known_fingerprint(self) -> str | None:
        return self.fingerprint

    @property
    def fingerprint(self) -> str:
        return self.split.fingerprint

    def materialise(self) -> ArraySplit:
        return self.split


class ImageFileSource(LabelledSource):
    """Image files decoded ``batch_size`` at a time for the graph's input spec.

    ``source_fingerprint`` (an image-folder dataset's file list) is the fingerprint when
    given; otherwise it is :func:`abstain.datasets.fingerprint` of the decoded pixels and
    labels, hashed batch by batch while the pixels stream (the same bytes in the same order,
    so the same value as hashing one array) and kept after the first full pass.
    """

    def __init__(
        self,
        paths: Sequence[Path | str],
        y: np.ndarray,
        spec: InputSpec,
        class_names: Sequence[str],
        name: str,
        source_fingerprint: str | None = None,
    ) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.y = np.asarray(y, dtype=np.int64)
        if self.y.shape != (len(self.paths),):
            raise ValueError(f"{name}: {len(self.paths)} images but labels of shape {self.y.shape}")
        self.spec, self.class_names, self.name = spec, tuple(class_names), name
        self.source_fingerprint = source_fingerprint
        self._pixel_fingerprint: str | None = None

    def _decode(self, paths: Sequence[Path]) -> np.ndarray:
        x = np.empty((len(paths), *self.spec.shape), dtype=np.float32)
        for i, path in enumerate(paths):
            x[i] = image_to_pixels(path, self.spec)
        return validate_pixels(x, self.spec)  # shape, NaN/Inf, range: same checks as serving

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        _check_batch_size(batch_size)
        n = len(self.paths)
        if n == 0:
            validate_pixels(np.empty((0, *self.spec.shape), np.float32), self.spec)  # raises: empty
        digest = None
        if self.source_fingerprint is None and self._pixel_fingerprint is None:
            digest = hashlib.sha256(repr((n, *self.spec.shape)).encode())
        for i in range(0, n, batch_size):
            x = self._decode(self.paths[i : i + batch_size])
            if digest is not None:
                digest.update(x.tobytes())
            yield x
        if digest is not None:
            digest.update(np.ascontiguousarray(self.y, dtype=np.int64).tobytes())
            self._pixel_fingerprint = "sha256:" + digest.hexdigest()

    @property
    def known_fingerprint(self) -> str | None:
        return self.source_fingerprint or self._pixel_fingerprint

    @property
    def fingerprint(self) -> str:
        if self.known_fingerprint is None:
            for _ in self.iter_batches(256):  # one streamed pass computes it
                pass
        fingerprint = self.known_fingerprint
        if fingerprint is None:
            raise RuntimeError(f"{type(self).__name__}: a full pass over the data computed no fingerprint")
        return fingerprint

    def materialise(self) -> ArraySplit:
        return ArraySplit(
            x=self._decode(self.paths),
            y=self.y,
            class_names=self.class_names,
            name=self.name,
            source_fingerprint=self.source_fingerprint,
        )


def open_imagefolder_split(
    root: Path, split: str, spec: InputSpec, class_names: Sequence[str]
) -> ImageFileSource:
    """``--dataset imagefolder``: training's split of ``root`` (train/val carved from ``root/train``,
    test = ``root/val``), decoded for the graph in batches, fingerprinted by its file list."""
    files = imagefolder_split(root, split)
    if tuple(class_names) != files.class_names:
        raise ValueError(
            f"{files.name} in {root}: the class folders {list(files.class_names)[:5]}... "
            f"({len(files.class_names)}) are not the graph's classes {list(class_names)[:5]}... "
            f"({len(class_names)}); calibrate a graph on the dataset it was trained on"
        )
    return ImageFileSource(
        files.paths, files.y, spec, files.class_names, files.name, source_fingerprint=files.fingerprint
    )


def open_dataset_split(
    name: str, split: str, spec: InputSpec, class_names: Sequence[str], data_root: Path | None = None
) -> LabelledSource:
    """``--dataset NAME --split SPLIT``: one of :data:`DATASETS`."""
    if name in ARRAY_DATASETS:
        return ArraySource(load_array_dataset(name, split, data_root))
    if name == "cifar100":
        return ArraySource(load_cifar100(split, data_root))
    if name == "imagefolder":
        if data_root is None:
            raise ValueError("dataset imagefolder needs --data-root (the folder holding train/ and val/)")
        return open_imagefolder_split(Path(data_root), split, spec, class_names)
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


def open_image_folder(root: Path, spec: InputSpec, class_names: Sequence[str]) -> ImageFileSource:
    """``root/<class>/<image>``, decoded in batches; ``<class>`` is a class name of the graph or an index."""
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
    return ImageFileSource(paths, np.asarray(labels, dtype=np.int64), spec, class_names, str(root))


def open_labelled_data(
    spec: InputSpec,
    class_names: Sequence[str],
    *,
    dataset: str | None = None,
    split: str = "val",
    data: Path | None = None,
    data_root: Path | None = None,
) -> LabelledSource:
    """Open one source (``dataset``+``split`` or ``data`` path) and check it against the graph.

    Arrays are checked whole here; image files batch by batch as
    :meth:`LabelledSource.iter_batches` decodes them. Raises ``ValueError`` for: no or two
    sources, a shape other than the graph's ``[N, C, H, W]``, NaN/Inf or pixels outside
    [0, 1], labels outside ``[0, K)``.
    """
    if (dataset is None) == (data is None):
        raise ValueError(
            "give exactly one data source: --dataset NAME --split SPLIT, or --data PATH "
            "(an .npz file with x and y, or an ImageFolder directory)"
        )
    source: LabelledSource
    if dataset is not None:
        source = open_dataset_split(dataset, split, spec, class_names, data_root)
    else:
        if data is None:  # excluded by the check above; this narrows its type
            raise ValueError("give exactly one data source: --dataset NAME --split SPLIT, or --data PATH")
        path = Path(data)
        if path.is_dir():
            source = open_image_folder(path, spec, class_names)
        elif path.suffix == ".npz" or path.is_file():
            source = ArraySource(load_npz(path, class_names))
        else:
            raise FileNotFoundError(f"{path}: no such .npz file or image directory")
    if isinstance(source, ArraySource):
        split_data = source.split
        x = validate_pixels(split_data.x, spec)  # shape, NaN/Inf, range: same checks as serving
        source = ArraySource(
            ArraySplit(
                x=x,
                y=split_data.y,
                class_names=tuple(class_names),
                name=split_data.name,
                source_fingerprint=split_data.source_fingerprint,
            )
        )
    y = source.y
    k = len(class_names)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= k):
        bad = sorted({int(v) for v in y[(y < 0) | (y >= k)]})[:5]
        raise ValueError(
            f"{source.name}: labels should be class indices in [0, {k}) for this graph's "
            f"{k} classes, but got {bad}"
        )
    return source


def load_labelled_data(
    spec: InputSpec,
    class_names: Sequence[str],
    *,
    dataset: str | None = None,
    split: str = "val",
    data: Path | None = None,
    data_root: Path | None = None,
) -> ArraySplit:
    """:func:`open_labelled_data` with every pixel in one array ``x`` (small data, tests)."""
    return open_labelled_data(
        spec, class_names, dataset=dataset, split=split, data=data, data_root=data_root
    ).materialise()
