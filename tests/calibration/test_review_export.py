"""``abstain review export`` writes what calibration reads: the .npz exactly, the image folder
to 8-bit precision, with the labels people gave."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from abstain.calibration.data_sources import open_labelled_data
from abstain.contract import InputSpec
from abstain.serving.store.decision_store import ReviewItem
from abstain.serving.store.review_export import export, select

SPEC = InputSpec(channels=1, height=8, width=8)
CLASSES = [str(k) for k in range(10)]


def items(n: int = 6, model: str = "digits") -> tuple[list[ReviewItem], np.ndarray]:
    x = np.random.default_rng(1).random((n, 1, 8, 8), dtype=np.float32)
    return [
        ReviewItem(
            f"id-{i}",
            time.time(),
            model,
            "1",
            "coverage-0.9",
            2,
            0.3,
            0.4,
            0.9,
            (1, 8, 8),
            x[i].tobytes(),
            label=i % 3,
        )
        for i in range(n)
    ], x


@pytest.mark.parametrize("fmt", ["npz", "imagefolder"])
def test_calibration_reads_the_export(tmp_path: Path, fmt: str) -> None:
    review, x = items()
    written = export(review, tmp_path / "round-1", fmt)
    split = open_labelled_data(SPEC, CLASSES, data=written).materialise()
    order = np.argsort([f"{i % 3}/id-{i}" for i in range(6)]) if fmt == "imagefolder" else np.arange(6)
    np.testing.assert_array_equal(split.y, (np.arange(6) % 3)[order])
    # .npz: the exact float32 pixels; image folder: PNG's 8 bits (at most half a step off)
    tolerance = 0.0 if fmt == "npz" else 0.5 / 255 + 1e-6
    np.testing.assert_allclose(split.x, x[order], atol=tolerance, rtol=0)


def test_export_refuses_a_mix_of_model_versions_and_nothing_to_export(tmp_path: Path) -> None:
    mixed = items(2)[0] + items(2, model="other")[0]
    with pytest.raises(ValueError, match="several model versions \\(digits/1, other/1\\); choose one"):
        select(mixed, None, None)
    assert len(select(mixed, "other", None)) == 2
    with pytest.raises(ValueError, match="no labelled review items for nope/\\*"):
        select(mixed, "nope", None)


def test_export_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(items()[0], tmp_path / "full", "npz")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary left behind
