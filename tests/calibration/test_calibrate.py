"""``abstain calibrate`` end to end on a throwaway linear digits graph (tests/graph_factory.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abstain.calibration.calibrate import predict, run_calibration
from abstain.calibration.data_sources import image_to_pixels
from abstain.contract import SCORE_NAMES
from abstain.datasets import load_digits
from abstain.io import sha256_file
from abstain.operating_points import load_calibration
from abstain.risk_coverage import aurc, coverage_and_risk
from abstain.runtime import OnnxModel
from tests.graph_factory import write_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits graph that records the digits train split as its training data."""
    train_fingerprint = load_digits("train").fingerprint
    return write_model_dir(tmp_path_factory.mktemp("repo"), train_fingerprint=train_fingerprint)


@pytest.fixture(scope="module")
def calibrated(version_dir: Path):
    return run_calibration(
        version_dir.parent,
        dataset="digits",
        split="val",
        coverages=[0.8, 0.9, 0.95],
        risks=[0.2, 0.001],
        delta=0.05,
    )


def test_calibration_file_binds_graph_data_and_thresholds(version_dir: Path, calibrated) -> None:
    cal = load_calibration(version_dir / "calibration.json")
    val = load_digits("val")
    assert cal.graph_sha256 == sha256_file(version_dir / "model.onnx")
    assert cal.data["fingerprint"] == val.fingerprint and cal.data["size"] == 359
    assert cal.names == ["coverage-0.8", "coverage-0.9", "coverage-0.95", "risk-0.2"]
    assert cal.default_operating_point == "coverage-0.9"
    # the score with the lowest AURC on the calibration data was chosen, for every point
    model = OnnxModel(version_dir / "model.onnx")
    preds = predict(model, val)
    aurcs = {name: aurc(preds.scores(name), preds.errors) for name in cal.scores}
    assert calibrated.chosen_score == min(aurcs, key=aurcs.get)
    assert {p.score for p in cal.operating_points} == {calibrated.chosen_score}
    assert cal.scores[calibrated.chosen_score]["aurc"] == pytest.approx(aurcs[calibrated.chosen_score])
    # every written threshold reproduces the measured coverage and risk on the same data
    for point in cal.operating_points:
        cov, risk, n_sel = coverage_and_risk(preds.scores(point.score), preds.errors, point.threshold)
        assert (cov, risk, n_sel) == (
            pytest.approx(point.coverage),
            pytest.approx(point.risk),
            point.extra["n_selected"],
        )
        if point.method == "coverage":
            lo, hi = point.extra["coverage_interval"]
            assert point.target_coverage <= cov and lo < cov < hi
            # one fewer sample answered would drop below the target: the largest such threshold
            assert (n_sel - 1) / 359 < point.target_coverage
        else:
            assert risk <= point.extra["risk_bound"] <= 0.2


def test_unmet_risk_target_reports_samples_needed(calibrated) -> None:
    (unmet,) = calibrated.calibration.unmet_targets
    assert unmet["name"] == "risk-0.001" and "threshold" not in unmet
    # zero errors among m answered: 1 - (δ/K)^(1/m) <= 0.001
    expected = math.ceil(math.log(unmet["delta_per_probe"]) / math.log1p(-0.001))
    assert unmet["samples_needed"] == expected > 359


def test_training_split_is_refused_and_old_file_kept(version_dir: Path, calibrated) -> None:
    before = (version_dir / "calibration.json").read_bytes()
    with pytest.raises(ValueError, match="is the graph's training data"):
        run_calibration(version_dir, dataset="digits", split="train")
    assert (version_dir / "calibration.json").read_bytes() == before


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coverages": [1.5]}, r"coverage targets should be in \(0, 1\], but got 1.5"),
        ({"coverages": [], "risks": [0.0]}, r"risk targets should be in \(0, 1\], but got 0.0"),
        ({"coverages": [0.9, 0.9]}, "should be distinct"),
        ({"delta": 1.0}, r"delta should be in \(0, 1\)"),
        ({"score": "entropy"}, "score should be one of selection, softmax_response, combined"),
    ],
)
def test_bad_arguments(version_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_calibration(version_dir, dataset="digits", split="val", **kwargs)


def test_bad_data(version_dir: Path, tmp_path: Path) -> None:
    val = load_digits("val")
    bad_labels = val.y.copy()
    bad_labels[3] = 10
    with pytest.raises(ValueError, match=r"labels should be class indices in \[0, 10\).*\[10\]"):
        run_calibration(version_dir, data=_npz(tmp_path / "labels.npz", val.x, bad_labels))
    nan_x = val.x.copy()
    nan_x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_calibration(version_dir, data=_npz(tmp_path / "nan.npz", nan_x, val.y))
    with pytest.raises(ValueError, match=r"shape \[N, 1, 8, 8\].*but got \[359, 1, 16, 16\]"):
        run_calibration(version_dir, data=_npz(tmp_path / "shape.npz", np.zeros((359, 1, 16, 16)), val.y))
    with pytest.raises(ValueError, match="too few samples to calibrate \\(10\\); give at least 30"):
        run_calibration(version_dir, data=_npz(tmp_path / "few.npz", val.x[:10], val.y[:10]))
    with pytest.raises(ValueError, match="give exactly one data source"):
        run_calibration(version_dir)
    with pytest.raises(FileNotFoundError, match=r"no such \.npz file"):
        run_calibration(version_dir, data=tmp_path / "absent.npz")


def test_image_folder_is_converted_to_the_graph_spec(tmp_path: Path) -> None:
    from PIL import Image

    from abstain.contract import InputSpec

    spec = InputSpec(3, 16, 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    version = write_model_dir(tmp_path / "models", spec=spec)
    val = load_digits("val")
    folder = tmp_path / "images"
    for i in range(40):
        label_dir = folder / str(val.y[i])
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(val.x[i, 0] * 255).astype(np.uint8), "L").save(label_dir / f"{i}.png")
    run = run_calibration(version, data=folder, coverages=[0.9])
    assert run.n == 40 and run.calibration.data["source"] == str(folder)
    pixels = image_to_pixels(folder / str(val.y[0]) / "0.png", spec)
    assert pixels.shape == (3, 16, 16) and np.array_equal(pixels[0], pixels[2])


def test_cli_writes_calibration_and_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    version = write_model_dir(tmp_path / "models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "calibrate",
            str(version.parent),
            "--dataset",
            "digits",
            "--split",
            "val",
            "--coverage",
            "0.85,0.9",
            "--risk",
            "0.3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout
    assert json.loads((version / "calibration.json").read_text())["default_operating_point"] == "coverage-0.9"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "calibrate",
            str(version.parent),
            "--dataset",
            "digits",
            "--coverage",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "coverage targets should be in (0, 1], but got 0.0" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_automatic_score_choice_splits_delta_over_the_candidate_scores(
    version_dir: Path, calibrated, tmp_path: Path
) -> None:
    # the score is chosen on the calibration data itself, so each candidate's SGR gets δ/3;
    # its probes then split that again: δ/3/K per probe
    assert calibrated.calibration.data["score_choice"] == "lowest AURC"
    assert calibrated.calibration.data["delta_per_score"] == pytest.approx(0.05 / len(SCORE_NAMES))
    risk_points = [p.extra for p in calibrated.calibration.operating_points if p.method == "risk"]
    risk_points += list(calibrated.calibration.unmet_targets)
    assert len(risk_points) == 2
    for extra in risk_points:
        assert extra["delta_per_score"] == pytest.approx(0.05 / 3)
        assert extra["delta_per_probe"] == pytest.approx(0.05 / 3 / extra["n_probes"])
    # with --score given there is no choice to pay for: δ/K per probe
    copy = shutil.copytree(version_dir.parent, tmp_path / version_dir.parent.name) / version_dir.name
    named = run_calibration(
        copy,
        dataset="digits",
        split="val",
        coverages=[],
        risks=[0.2],
        delta=0.05,
        score=calibrated.chosen_score,
    )
    (point,) = named.calibration.operating_points
    assert named.calibration.data["score_choice"] == "given"
    assert point.extra["delta_per_score"] == pytest.approx(0.05)
    assert point.extra["delta_per_probe"] == pytest.approx(0.05 / point.extra["n_probes"])
