"""``abstain calibrate`` writes, per operating point, the conformal set of its abstentions and the
label-free risk estimate, and the temperature; each recomputed here from the graph's outputs by
the definitions (not by the code under test), on the digits validation split."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abstain.calibration.abstention_sets import SetSpec
from abstain.calibration.calibrate import run_calibration
from abstain.datasets import load_digits
from abstain.operating_points import CalibrationError, calibration_from_dict, load_calibration
from abstain.runtime import OnnxModel
from tests.graph_factory import write_model_dir


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("repo"))


def _outputs(version_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax ``[N, K]`` (float64), softmax response ``[N]`` and labels ``[N]`` on digits/val."""
    val = load_digits("val")
    logits = OnnxModel(version_dir / "model.onnx").run(val.x).logits.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs, probs.max(axis=1), val.y


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_each_point_gets_the_conformal_quantile_of_its_abstentions(version_dir: Path, method: str) -> None:
    run_calibration(
        version_dir.parent,
        dataset="digits",
        coverages=[0.6, 0.8],
        score="softmax_response",
        prediction_set=SetSpec(method=method, alpha=0.2),
    )
    cal = load_calibration(version_dir / "calibration.json")
    probs, sr, y = _outputs(version_dir)
    for point in cal.operating_points:
        entry = point.extra["prediction_set"]
        abstained = sr < point.threshold
        n = int(abstained.sum())
        assert entry["n_calibration"] == n > 20
        # the definitions: LAC scores 1 - p_y; APS the mass of the classes at least as probable as y
        p, labels = probs[abstained], y[abstained]
        p_y = p[np.arange(n), labels]
        if method == "lac":
            scores = 1.0 - p_y
        else:
            scores = np.array(
                [
                    row[(row > t) | ((row == t) & (np.arange(10) <= k))].sum()
                    for row, t, k in zip(p, p_y, labels, strict=True)
                ]
            )
        rank = math.ceil((n + 1) * 0.8)  # ⌈(n + 1)(1 - alpha)⌉
        assert entry["quantile"] == pytest.approx(np.sort(scores)[rank - 1], abs=1e-12)
        assert entry["coverage"] == pytest.approx(np.mean(scores <= entry["quantile"]))
        assert entry["coverage"] >= 0.8 and (entry["method"], entry["alpha"]) == (method, 0.2)


def test_temperature_and_estimate_are_the_fitted_nll_minimum_and_the_mean_expected_error(
    version_dir: Path,
) -> None:
    run_calibration(version_dir.parent, dataset="digits", coverages=[0.9], score="softmax_response")
    cal = load_calibration(version_dir / "calibration.json")
    val = load_digits("val")
    logits = OnnxModel(version_dir / "model.onnx").run(val.x).logits.astype(np.float64)

    def nll(t: float) -> float:
        z = logits / t
        log_norm = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
        return float(np.mean(log_norm - z[np.arange(len(val.y)), val.y]))

    t = cal.temperature
    assert t is not None and cal.confidence_calibration["n"] == 359
    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02))  # a minimum of the NLL
    assert cal.confidence_calibration["nll"] == pytest.approx(nll(t))
    point = cal.operating_point("coverage-0.9")
    z = logits / t
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).max(axis=1)
    sr = np.exp(logits - logits.max(axis=1, keepdims=True))
    answered = (sr / sr.sum(axis=1, keepdims=True)).max(axis=1) >= point.threshold
    assert point.extra["estimated_risk"] == pytest.approx(np.mean(1.0 - p[answered]))
    assert point.extra["prediction_set"]["method"] == "lac"  # the default: LAC at 90 %


def test_too_few_abstentions_give_every_class_and_the_command_says_so(version_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "abstain", "calibrate", str(version_dir.parent), "--dataset", "digits",
         "--coverage", "0.995", "--set-alpha", "0.05"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    entry = load_calibration(version_dir / "calibration.json").operating_points[0].extra["prediction_set"]
    assert entry["n_calibration"] < 19 == entry["min_samples"] and entry["quantile"] is None
    assert entry["mean_size"] == 10.0
    assert "fewer than the 19 a 95% set needs" in " ".join(done.stdout.split())


def test_no_sets_and_bad_set_fields() -> None:
    raw = {
        "schema_version": 1,
        "graph_sha256": "0" * 64,
        "operating_points": [{"name": "c", "method": "coverage", "score": "selection", "threshold": 0.5}],
        "default_operating_point": "c",
    }
    assert calibration_from_dict(raw).temperature is None  # files older than the fields still load
    for bad, message in [
        ({"method": "raps", "alpha": 0.1, "quantile": 0.5}, "prediction_set"),
        ({"method": "lac", "alpha": 1.0, "quantile": 0.5}, "prediction_set"),
        ({"method": "lac", "alpha": 0.1, "quantile": "inf"}, "prediction_set"),
    ]:
        point = {**raw["operating_points"][0], "prediction_set": bad}
        with pytest.raises(CalibrationError, match=message):
            calibration_from_dict({**raw, "operating_points": [point]})
    with pytest.raises(CalibrationError, match="positive finite temperature"):
        calibration_from_dict({**raw, "confidence_calibration": {"temperature": -1.0}})
