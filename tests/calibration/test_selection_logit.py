"""Issue 10: g saturates in float32; graphs that export g's logit calibrate and evaluate on it.

The graph here is the test factory's linear digits model with g's bias shifted by +20, so
every validation image has z > 17 and float32 ``selection`` is exactly 1.0 for all of them:
g cannot rank them at all, while z can.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from abstain.calibration.calibrate import predict, run_calibration
from abstain.calibration.evaluate import run_evaluation
from abstain.contract import SCORE_SCALE_LOGIT, SCORE_SCALE_PROBABILITY
from abstain.operating_points import CalibrationError, check_score_scale, load_calibration
from abstain.risk_coverage import selection_scores, sigmoid
from abstain.runtime import OnnxModel
from tests.digits import load_digits
from tests.graph_factory import write_model_dir

N_VAL = 359  # digits/val


@pytest.fixture(scope="module")
def saturated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("logit"), selection_logit=True, logit_shift=20.0)


def test_the_graph_saturates_g_and_its_logit_does_not(saturated: Path) -> None:
    model = OnnxModel(saturated / "model.onnx")
    out = model.run_batched(load_digits("val").x)
    assert model.has_selection_logit
    assert (out.selection == 1.0).all()  # float32 sigmoid(z) for z > 17: one tied value
    assert out.selection_logit is not None and out.selection_logit.min() > 17.0
    assert np.unique(out.selection_logit).size > 0.9 * N_VAL
    # g is sigmoid(z): the two outputs agree wherever float32 can tell
    np.testing.assert_allclose(out.selection, sigmoid(out.selection_logit), rtol=1e-6)


def test_calibration_thresholds_the_logit_exactly(saturated: Path, tmp_path: Path) -> None:
    run = run_calibration(saturated, dataset="digits", split="val", coverages=[0.8, 0.9], score="selection")
    for point in run.calibration.operating_points:
        assert point.extra["score_scale"] == SCORE_SCALE_LOGIT
        assert point.threshold > 17.0  # a logit, not a probability
        # distinct logits: the coverage point answers exactly ceil(c · n) images
        assert point.extra["n_selected"] == math.ceil(point.target_coverage * N_VAL)
    reloaded = load_calibration(run.path)
    assert reloaded.operating_point("coverage-0.8").extra["score_scale"] == SCORE_SCALE_LOGIT
    report = run_evaluation(saturated, tmp_path, dataset="digits", split="test").report
    preds = predict(OnnxModel(saturated / "model.onnx"), load_digits("test"))
    for row in report["operating_points"]:
        z = preds.outputs.selection_logit
        assert row["realized_coverage"] == pytest.approx((z >= row["threshold"]).mean())
        assert row["realized_coverage"] < 1.0  # not everything: the logit tells images apart


def test_an_older_graph_without_the_logit_still_calibrates_on_g(tmp_path: Path) -> None:
    """The same weights without ``selection_logit``: it works, but g's tie overshoots coverage."""
    version = write_model_dir(tmp_path, logit_shift=20.0)
    assert not OnnxModel(version / "model.onnx").has_selection_logit
    run = run_calibration(version, dataset="digits", split="val", coverages=[0.8], score="selection")
    point = run.calibration.operating_point("coverage-0.8")
    assert point.extra["score_scale"] == SCORE_SCALE_PROBABILITY
    assert (point.threshold, point.coverage) == (1.0, 1.0)  # the whole tie: 0.8 became 1.0
    report = run_evaluation(version, tmp_path / "eval", dataset="digits", split="test").report
    assert report["operating_points"][0]["realized_coverage"] == 1.0


def test_a_threshold_on_the_wrong_scale_is_refused(saturated: Path, tmp_path: Path) -> None:
    run = run_calibration(saturated, dataset="digits", split="val", coverages=[0.9], score="selection")
    check_score_scale(run.calibration, has_selection_logit=True, where="x")  # consistent
    with pytest.raises(CalibrationError, match=r"threshold on the logit scale.*probability scale"):
        check_score_scale(run.calibration, has_selection_logit=False, where="x")
    # a calibration file from before issue 10 (no score_scale) is a probability threshold
    old = run.calibration.operating_point()
    bare = {k: v for k, v in old.extra.items() if k != "score_scale"}
    from dataclasses import replace

    legacy = replace(run.calibration, operating_points=(replace(old, extra=bare),))
    check_score_scale(legacy, has_selection_logit=False, where="x")
    with pytest.raises(CalibrationError, match="probability scale, but this graph's 'selection' score"):
        check_score_scale(legacy, has_selection_logit=True, where="x")


def test_selection_scores_with_and_without_the_logit() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    g = np.array([1.0, 1.0], dtype=np.float32)  # both saturated in float32
    z = np.array([18.0, 25.0], dtype=np.float32)
    assert selection_scores(logits, g, "selection").tolist() == [1.0, 1.0]
    assert selection_scores(logits, g, "selection", z).tolist() == [18.0, 25.0]
    sr = np.array([math.exp(2) / (math.exp(2) + 1), 0.5])
    combined = selection_scores(logits, g, "combined", z)
    expected = np.sqrt(np.array([1 / (1 + math.exp(-18)), 1 / (1 + math.exp(-25))]) * sr)
    np.testing.assert_allclose(combined, expected, rtol=1e-15)
    assert sigmoid(np.array([-800.0, 0.0, 800.0])).tolist() == [0.0, 0.5, 1.0]  # no overflow


def test_offline_predict_decides_on_the_logit(saturated: Path, tmp_path: Path) -> None:
    import csv

    from abstain.calibration.predict import run_predict

    run = run_calibration(saturated, dataset="digits", split="val", coverages=[0.5], score="selection")
    threshold = run.calibration.operating_point().threshold
    out = tmp_path / "decisions.csv"
    run_predict(saturated, out, dataset="digits", split="test")
    rows = list(csv.DictReader(out.open()))
    z = OnnxModel(saturated / "model.onnx").run_batched(load_digits("test").x).selection_logit
    assert [float(r["score_value"]) for r in rows] == pytest.approx(z.tolist(), abs=1e-5)
    assert [r["decision"] == "predict" for r in rows] == (z >= threshold).tolist()
    assert 0.3 < np.mean(z >= threshold) < 0.7  # g (all 1.0) would have answered every image
