"""Datasets built from files the tests write in the real formats (IDX, CIFAR pickles, PNG folders)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR100

from abstain.datasets import fingerprint, load_fashion_mnist
from abstain.training.data import load_data, streaming_fingerprint


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: 00 00 08 ndim, then big-endian uint32 dims, then uint8 values (gzipped like Debian's)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    # 12 training images per class → the fixed 11/12 : 1/12 split gives 110 train, 10 val
    labels = np.repeat(np.arange(10), 12)
    images = (labels[:, None, None] * 20 + np.zeros((1, 28, 28))).astype(np.uint8)  # pixel = 20·label
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:20])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:20])
    return tmp_path


def test_fashion_mnist_from_idx_files(fashion_root: Path) -> None:
    data = load_data("fashion-mnist", fashion_root)
    assert (len(data.train), len(data.val), len(data.test)) == (110, 10, 20)
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full((1, 28, 28), 20 * int(y) / 255))
    assert data.class_names[0] == "T-shirt/top"
    assert (data.input_spec.channels, data.input_spec.height) == (1, 28)
    # the checkpoint's fingerprint is the one calibration computes for the same split
    assert data.fingerprint == load_fashion_mnist("train", fashion_root).fingerprint


def test_fashion_mnist_missing_root_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_data("fashion-mnist", tmp_path)


def test_streaming_fingerprint_equals_the_whole_array_fingerprint() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)  # [N, H, W, C] as CIFAR stores
    labels = rng.integers(0, 5, size=10)
    whole = fingerprint(images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255), labels)
    assert streaming_fingerprint(images, labels, chunk=3) == whole


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 3-class CIFAR-100 in torchvision's python-pickle format (20 train / 6 test images).

    torchvision refuses files whose md5 differs from the real archive's. Rather than skip its
    check, we register the md5s of the files we wrote (class attributes ``train_list``,
    ``test_list``, ``meta``): the real integrity check and the real unpickling both run.
    """
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    def pickle_split(name: str, n: int) -> None:
        labels = [i % 3 for i in range(n)]
        data = np.zeros((n, 3 * 32 * 32), dtype=np.uint8)
        for i in range(n):  # row layout: 1024 red, 1024 green, 1024 blue; value 10·channel + i
            data[i] = np.repeat(np.array([10 * c + i for c in range(3)], dtype=np.uint8), 1024)
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [0] * n, "filenames": [""] * n}
        (folder / name).write_bytes(pickle.dumps(entry))

    pickle_split("train", 20)
    pickle_split("test", 6)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bear", "cloud"]}))
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(
        CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": _md5(folder / "meta")}
    )
    return tmp_path


def test_cifar100_from_python_pickles(cifar_root: Path) -> None:
    data = load_data("cifar100", cifar_root)
    assert data.class_names == ("apple", "bear", "cloud")
    # 10 % of each class to val: round(0.1 · 7) = 1, round(0.1 · 7) = 1, round(0.1 · 6) = 1
    assert (len(data.train), len(data.val), len(data.test)) == (17, 3, 6)
    x, y = data.test[4]
    assert x.shape == (3, 32, 32) and y == 1
    assert torch.allclose(x[:, 5, 7], torch.tensor([4, 14, 24]) / 255)  # 10·c + i, i = 4
    assert data.input_spec.shape == (3, 32, 32)
    val_idx = set(data.val.indices)  # type: ignore[attr-defined]
    assert val_idx.isdisjoint(data.train.indices)  # type: ignore[attr-defined]
    # train images are augmented (random crop with padding 4, flip) but keep their shape
    assert data.train[0][0].shape == (3, 32, 32)


def test_cifar100_corrupted_or_missing(cifar_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-100-python/ with files train, test and meta"):
        load_data("cifar100", tmp_path / "elsewhere")
    (cifar_root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="incomplete or corrupted"):
        load_data("cifar100", cifar_root)


def write_image_tree(root: Path, classes: dict[str, tuple[int, int]]) -> None:
    """root/<class>/<i>.png, 12×10 RGB images; ``classes`` maps a name to (count, grey level)."""
    for name, (count, level) in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (12, 10), (level, level, level)).save(root / name / f"{i}.png")


def test_imagefolder_train_val_layout(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "train", {"cat": (10, 0), "dog": (10, 255)})
    write_image_tree(tmp_path / "val", {"cat": (2, 0), "dog": (2, 255)})
    data = load_data("imagefolder", tmp_path)
    assert data.class_names == ("cat", "dog")
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 4)  # 10 % of train/ per class → val
    x, y = data.test[3]
    assert x.shape == (3, 224, 224) and y == 1 and torch.allclose(x, torch.ones_like(x))
    assert data.train[0][0].shape == (3, 224, 224)
    assert data.fingerprint.startswith("sha256:")


def test_imagefolder_errors_name_the_layout(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "train", {"cat": (2, 0), "dog": (2, 255)})
    with pytest.raises(FileNotFoundError, match=r"expected .*/train/<class>/<image> and .*/val/<class>"):
        load_data("imagefolder", tmp_path)
    write_image_tree(tmp_path / "val", {"cat": (1, 0), "cow": (1, 255)})
    with pytest.raises(ValueError, match="same class folders"):
        load_data("imagefolder", tmp_path)


def test_unknown_dataset_and_missing_root() -> None:
    with pytest.raises(ValueError, match="dataset should be one of digits, fashion-mnist, cifar100"):
        load_data("mnist")
    with pytest.raises(ValueError, match="cifar100 needs --data-root"):
        load_data("cifar100")


def test_download_needs_a_folder_to_download_into() -> None:
    with pytest.raises(ValueError, match="--download needs --data-root"):
        load_data("fashion-mnist", None, download=True)


def test_imagefolder_split_and_fingerprint_are_calibrations(tmp_path: Path) -> None:
    from abstain.calibration.data_sources import load_labelled_data
    from abstain.contract import InputSpec
    from abstain.datasets import imagefolder_split

    write_image_tree(tmp_path / "train", {"cat": (20, 0), "dog": (10, 255)})
    write_image_tree(tmp_path / "val", {"cat": (2, 0), "dog": (2, 255)})
    data = load_data("imagefolder", tmp_path)
    samples = data.train.dataset.samples  # type: ignore[attr-defined]
    val_files = tuple(samples[i][0] for i in data.val.indices)  # type: ignore[attr-defined]
    assert val_files == imagefolder_split(tmp_path, "val").paths  # the files calibration reads as val
    spec = InputSpec(3, 16, 16, (0.0,) * 3, (1.0,) * 3)
    calibration_train = load_labelled_data(
        spec, data.class_names, dataset="imagefolder", split="train", data_root=tmp_path
    )
    assert data.fingerprint == calibration_train.fingerprint  # so calibration can refuse it


def test_imagefolder_eval_transform_is_servings_preprocessing(tmp_path: Path) -> None:
    from abstain.calibration.data_sources import image_to_pixels
    from abstain.contract import InputSpec

    rng = np.random.default_rng(0)
    sizes = {"cat": [(300, 250), (250, 300), (224, 224)], "dog": [(97, 131), (640, 480)]}
    for split in ("train", "val"):
        for name, shapes in sizes.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i, (w, h) in enumerate(shapes):
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    data = load_data("imagefolder", tmp_path)
    spec = InputSpec(3, 224, 224, (0.0,) * 3, (1.0,) * 3)
    for i, (path, _) in enumerate(data.test.samples):  # type: ignore[attr-defined]
        trained = data.test[i][0].numpy()  # torchvision Resize(256) + CenterCrop(224) + ToTensor
        np.testing.assert_array_equal(image_to_pixels(Path(path), spec), trained)


def test_cifar100_calibration_split_is_trainings(cifar_root: Path) -> None:
    from abstain.datasets import load_cifar100

    data = load_data("cifar100", cifar_root)
    assert load_cifar100("train", cifar_root).fingerprint == data.fingerprint
    val = load_cifar100("val", cifar_root)
    assert len(val) == len(data.val) and val.class_names == data.class_names
    for i in range(len(val)):
        x, y = data.val[i]
        assert y == val.y[i] and np.array_equal(x.numpy(), val.x[i])
    assert len(load_cifar100("test", cifar_root)) == 6
