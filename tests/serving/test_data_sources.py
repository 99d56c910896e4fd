"""Calibration data sources: imagefolder / CIFAR-100 splits as training made them, image preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from abstain.contract import InputSpec
from abstain.datasets import imagefolder_split, load_digits
from serving.calibrate import run_calibration
from serving.data_sources import image_to_pixels, load_labelled_data
from tests.graph_factory import write_model_dir

CLASSES = tuple(f"c{i}" for i in range(10))
SPEC16 = InputSpec(3, 16, 16, mean=(0.0,) * 3, std=(1.0,) * 3)


@pytest.fixture(scope="module")
def digit_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,val}/c<k>/*.png: digits as 8×8 grey PNGs; 30 per class in train/, 3 in val/."""
    root = tmp_path_factory.mktemp("imagefolder")
    digits = load_digits("train")
    for part, per_class in (("train", 30), ("val", 3)):
        for k in range(10):
            (root / part / f"c{k}").mkdir(parents=True)
            picks = np.flatnonzero(digits.y == k)[:per_class] if part == "train" else \
                np.flatnonzero(digits.y == k)[-per_class:]
            for i in picks:
                pixels = np.rint(digits.x[i, 0] * 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / part / f"c{k}" / f"{i}.png")
    return root


def test_imagefolder_dataset_gives_trainings_split_and_file_fingerprint(digit_tree: Path) -> None:
    val = load_labelled_data(SPEC16, CLASSES, dataset="imagefolder", split="val", data_root=digit_tree)
    assert val.x.shape == (30, 3, 16, 16) and np.bincount(val.y).tolist() == [3] * 10
    assert val.name == "imagefolder/val"
    assert val.fingerprint == imagefolder_split(digit_tree, "val").fingerprint
    train = load_labelled_data(SPEC16, CLASSES, dataset="imagefolder", split="train", data_root=digit_tree)
    assert len(train) == 270 and train.fingerprint == imagefolder_split(digit_tree, "train").fingerprint
    test = load_labelled_data(SPEC16, CLASSES, dataset="imagefolder", split="test", data_root=digit_tree)
    assert len(test) == 30 and test.fingerprint == imagefolder_split(digit_tree, "test").fingerprint


def test_imagefolder_dataset_errors(digit_tree: Path) -> None:
    with pytest.raises(ValueError, match="imagefolder needs --data-root"):
        load_labelled_data(SPEC16, CLASSES, dataset="imagefolder", split="val")
    with pytest.raises(ValueError, match="not the graph's classes"):
        load_labelled_data(SPEC16, tuple("abcdefghij"), dataset="imagefolder", split="val",
                           data_root=digit_tree)
    with pytest.raises(ValueError, match="one of digits, fashion-mnist, cifar100, imagefolder"):
        load_labelled_data(SPEC16, CLASSES, dataset="imagenet", split="val")


def test_calibrate_refuses_the_imagefolder_training_split(digit_tree: Path, tmp_path: Path) -> None:
    # the graph records what training records for imagefolder: the train files' list fingerprint
    train_fp = imagefolder_split(digit_tree, "train").fingerprint
    version = write_model_dir(tmp_path / "models", spec=SPEC16, class_names=CLASSES,
                              train_fingerprint=train_fp)
    with pytest.raises(ValueError, match="imagefolder/train is the graph's training data"):
        run_calibration(version, dataset="imagefolder", split="train", data_root=digit_tree, coverages=[0.9])
    run = run_calibration(version, dataset="imagefolder", split="val", data_root=digit_tree, coverages=[0.9])
    assert run.n == 30
    assert run.calibration.data["fingerprint"] == imagefolder_split(digit_tree, "val").fingerprint


def test_large_rgb_graphs_get_resize_and_centre_crop(tmp_path: Path) -> None:
    # 240×80: black | grey | white thirds. Shorter side 80 → round(64·256/224) = 73, width
    # int(73·240/80) = 219; the centre 64 columns start at round(155/2) = 78, inside the grey third
    # (columns 73-145). A stretch to 64×64 would show all three thirds.
    stripes = np.zeros((80, 240, 3), np.uint8)
    stripes[:, 80:160] = 128
    stripes[:, 160:] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    x = image_to_pixels(tmp_path / "stripes.png", InputSpec(3, 64, 64, (0.0,) * 3, (1.0,) * 3))
    assert x.shape == (3, 64, 64)
    np.testing.assert_allclose(x, 128 / 255, atol=1e-6)
    # small graphs (digits, Fashion-MNIST, CIFAR sizes) keep the direct resize
    small = image_to_pixels(tmp_path / "stripes.png", InputSpec(1, 6, 6))
    assert small[0, 0, 0] == 0.0 and small[0, 0, -1] == 1.0


def test_decompression_bomb_is_a_clear_value_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's limit; errors above twice it
    with pytest.raises(ValueError, match=r"big\.png: the image is too large to decode safely"):
        image_to_pixels(tmp_path / "big.png", InputSpec(1, 8, 8))
