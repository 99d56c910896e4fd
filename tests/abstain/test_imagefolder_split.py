"""The image-folder split and file-list fingerprint shared by training and calibration (no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from abstain.datasets import (
    ArraySplit,
    file_list_fingerprint,
    imagefolder_resize_size,
    imagefolder_split,
    scan_image_folder,
)


def write_tree(root: Path, counts: dict[str, int]) -> None:
    """root/<class>/<i>.png (6×5 RGB, grey level i) plus a non-image and a nested image."""
    for name, count in counts.items():
        (root / name / "nested").mkdir(parents=True)
        for i in range(count - 1):
            Image.new("RGB", (6, 5), (i, i, i)).save(root / name / f"{i:02d}.png")
        Image.new("RGB", (6, 5), (99, 0, 0)).save(root / name / "nested" / "z.PNG")  # os.walk, any case
        (root / name / "notes.txt").write_text("not an image")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_tree(tmp_path / "train", {"cat": 20, "dog": 10})
    write_tree(tmp_path / "val", {"cat": 3, "dog": 2})
    return tmp_path


def test_scan_lists_images_like_imagefolder(tree: Path) -> None:
    classes, samples = scan_image_folder(tree / "train")
    assert classes == ("cat", "dog")
    assert len(samples) == 30 and not any(p.endswith(".txt") for p, _ in samples)
    assert samples[0] == (str(tree / "train" / "cat" / "00.png"), 0)
    assert samples[19] == (str(tree / "train" / "cat" / "nested" / "z.PNG"), 0)
    assert samples[20][1] == 1


def test_train_val_are_carved_from_train_per_class_and_test_is_val(tree: Path) -> None:
    train, val, test = (imagefolder_split(tree, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (27, 3, 5)  # round(0.1·20) = 2 cats, round(0.1·10) = 1 dog
    assert np.bincount(val.y).tolist() == [2, 1]
    assert set(train.paths).isdisjoint(val.paths)
    assert sorted(train.paths + val.paths) == sorted(p for p, _ in scan_image_folder(tree / "train")[1])
    assert all("/val/" in p for p in test.paths) and test.name == "imagefolder/test"
    assert imagefolder_split(tree, "val").paths == val.paths  # fixed seed: the same files every time


def test_file_list_fingerprint_is_relative_path_and_size(tree: Path) -> None:
    train = imagefolder_split(tree, "train")
    digest = hashlib.sha256()
    for path in sorted(train.paths):
        rel = Path(path).relative_to(tree).as_posix()
        digest.update(f"{rel}\t{Path(path).stat().st_size}\n".encode())
    expected = "sha256:" + digest.hexdigest()
    assert train.fingerprint == file_list_fingerprint(tree, reversed(train.paths)) == expected
    assert imagefolder_split(tree, "val").fingerprint != train.fingerprint
    # an ArraySplit carrying it reports it instead of a hash of its pixels
    split = ArraySplit(
        x=np.zeros((1, 1, 2, 2), np.float32),
        y=np.zeros(1, np.int64),
        class_names=("a",),
        name="n",
        source_fingerprint=train.fingerprint,
    )
    assert split.fingerprint == train.fingerprint


def test_layout_errors_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"expected .*/train/<class>/<image>"):
        imagefolder_split(tmp_path, "val")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes cat"):
        imagefolder_split(tmp_path, "train")
    with pytest.raises(ValueError, match="split should be one of train, val, test"):
        imagefolder_split(tmp_path, "validation")


def test_resize_size_is_imagenets_256_for_224() -> None:
    assert imagefolder_resize_size(224) == 256 and imagefolder_resize_size(64) == 73
