"""Calibration data sources: imagefolder / CIFAR-100 splits as training made them, image preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from abstain.calibration.calibrate import run_calibration
from abstain.calibration.data_sources import image_to_pixels, load_labelled_data
from abstain.contract import InputSpec
from abstain.datasets import imagefolder_split, load_digits
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
            picks = (
                np.flatnonzero(digits.y == k)[:per_class]
                if part == "train"
                else np.flatnonzero(digits.y == k)[-per_class:]
            )
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
        load_labelled_data(
            SPEC16, tuple("abcdefghij"), dataset="imagefolder", split="val", data_root=digit_tree
        )
    with pytest.raises(ValueError, match="one of digits, fashion-mnist, cifar100, imagefolder"):
        load_labelled_data(SPEC16, CLASSES, dataset="imagenet", split="val")


def test_calibrate_refuses_the_imagefolder_training_split(digit_tree: Path, tmp_path: Path) -> None:
    # the graph records what training records for imagefolder: the train files' list fingerprint
    train_fp = imagefolder_split(digit_tree, "train").fingerprint
    version = write_model_dir(
        tmp_path / "models", spec=SPEC16, class_names=CLASSES, train_fingerprint=train_fp
    )
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


# --- streaming: image files go through inference batch by batch ----------------------------------

SPEC32 = InputSpec(3, 32, 32, mean=(0.0,) * 3, std=(1.0,) * 3)
STREAM_PER_CLASS = 150  # 1,500 images: 18.4 MB of float32 pixels as one [N, 3, 32, 32] array


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/val/c<k>/*.png: 150 RGB 32×32 digits per class (noisy copies, so every file differs)."""
    from tests.graph_factory import resize_digits

    root = tmp_path_factory.mktemp("big_imagefolder")
    digits = load_digits("train")
    big = resize_digits(digits.x, SPEC32)
    rng = np.random.default_rng(0)
    for k in range(10):
        (root / "val" / f"c{k}").mkdir(parents=True)
        picks = np.flatnonzero(digits.y == k)
        for j in range(STREAM_PER_CLASS):
            image = big[picks[j % len(picks)]].transpose(1, 2, 0) + rng.normal(0, 0.05, (32, 32, 3))
            pixels = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(root / "val" / f"c{k}" / f"{j:04d}.png")
    return root


def test_image_sources_stream_in_batches_with_the_same_fingerprints(big_tree: Path) -> None:
    from abstain.calibration.data_sources import ImageFileSource, open_labelled_data
    from abstain.datasets import fingerprint

    n = 10 * STREAM_PER_CLASS
    split = open_labelled_data(SPEC32, CLASSES, dataset="imagefolder", split="test", data_root=big_tree)
    assert isinstance(split, ImageFileSource) and len(split) == n
    sizes = [x.shape[0] for x in split.iter_batches(64)]
    assert max(sizes) <= 64 and sum(sizes) == n
    # the file list's fingerprint, known before any pixel is decoded
    assert split.known_fingerprint == split.fingerprint == imagefolder_split(big_tree, "test").fingerprint
    # an image directory: the hash of its decoded pixels, taken while they stream
    folder = open_labelled_data(SPEC32, CLASSES, data=big_tree / "val")
    assert folder.known_fingerprint is None
    batches = list(folder.iter_batches(100))
    assert all(x.shape[0] <= 100 and x.dtype == np.float32 for x in batches)
    whole = load_labelled_data(SPEC32, CLASSES, data=big_tree / "val")
    np.testing.assert_array_equal(np.concatenate(batches), whole.x)
    assert folder.known_fingerprint == folder.fingerprint == whole.fingerprint
    assert whole.fingerprint == fingerprint(whole.x, whole.y)
    assert whole.fingerprint != split.fingerprint


def test_calibrate_and_evaluate_stream_image_folders(big_tree: Path, tmp_path: Path) -> None:
    import tracemalloc

    from abstain.calibration.evaluate import run_evaluation

    version = write_model_dir(tmp_path / "models", spec=SPEC32, class_names=CLASSES)
    tracemalloc.start()
    try:  # the in-memory path: every pixel of the split in one array
        whole = load_labelled_data(SPEC32, CLASSES, dataset="imagefolder", split="test", data_root=big_tree)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    split_bytes = whole.x.nbytes
    # streaming's bound: half the split's pixels. What streaming holds is ~2 MB (a batch, the
    # outputs, the file list); an interpreter table that grows on the way (the interned-string
    # dict: ~4 MB) must not fail the test, while one array of the split (18.4 MB) clearly does.
    bound = split_bytes / 2
    assert split_bytes > 18e6 and whole_peak > split_bytes > bound
    np.savez(tmp_path / "whole.npz", x=whole.x, y=whole.y)
    del whole
    in_memory = run_calibration(version, data=tmp_path / "whole.npz", coverages=[0.8, 0.9], risks=[0.05])
    memory_eval = run_evaluation(version, tmp_path / "eval_npz", data=tmp_path / "whole.npz")

    tracemalloc.start()
    try:
        streamed = run_calibration(
            version,
            dataset="imagefolder",
            split="test",
            data_root=big_tree,
            coverages=[0.8, 0.9],
            risks=[0.05],
            batch_size=32,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # (b) the split's pixels are never one array: batches of 32 images (393 kB) come and go
    assert peak < bound, (peak, split_bytes)

    # (a) the same thresholds, coverages and scores as the in-memory path on the same pixels
    assert streamed.n == in_memory.n == 10 * STREAM_PER_CLASS
    assert streamed.calibration.operating_points == in_memory.calibration.operating_points
    assert streamed.calibration.scores == in_memory.calibration.scores
    assert streamed.chosen_score == in_memory.chosen_score and streamed.accuracy == in_memory.accuracy
    assert streamed.calibration.data["fingerprint"] == imagefolder_split(big_tree, "test").fingerprint

    # evaluate streams too (the same calibration.json, the directory given as --data DIR)
    tracemalloc.start()
    try:
        streamed_eval = run_evaluation(version, tmp_path / "eval_dir", data=big_tree / "val", batch_size=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound, (peak, split_bytes)
    for key in ("operating_points", "scores"):
        assert streamed_eval.report[key] == memory_eval.report[key]
    # a directory's fingerprint is its pixels' hash, as when they were one array
    assert streamed_eval.report["data"] == memory_eval.report["data"] | {"source": str(big_tree / "val")}
