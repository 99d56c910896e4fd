"""abstain.operating_points: the extension for unmet risk targets, and refusing non-finite thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abstain.operating_points import (
    Calibration,
    CalibrationError,
    OperatingPoint,
    calibration_from_dict,
    load_calibration,
    save_calibration,
)

POINT = OperatingPoint(
    name="coverage-0.9",
    method="coverage",
    score="combined",
    threshold=0.63,
    target_coverage=0.9,
    coverage=0.9,
    risk=0.01,
    extra={"coverage_interval": [0.86, 0.93], "n_selected": 323},
)


def test_round_trip_keeps_extra_fields_and_unmet_targets(tmp_path: Path) -> None:
    unmet = {"name": "risk-0.001", "method": "risk", "target_risk": 0.001, "samples_needed": 5191}
    cal = Calibration(
        graph_sha256="a" * 64,
        operating_points=(POINT,),
        default_operating_point="coverage-0.9",
        unmet_targets=(unmet,),
    )
    save_calibration(tmp_path / "calibration.json", cal)
    back = load_calibration(tmp_path / "calibration.json")
    assert back.operating_point().extra == {"coverage_interval": [0.86, 0.93], "n_selected": 323}
    assert back.unmet_targets == (unmet,)
    # files written before the extension (no unmet_targets key) still load
    raw = json.loads((tmp_path / "calibration.json").read_text())
    del raw["unmet_targets"]
    assert calibration_from_dict(raw).unmet_targets == ()


def test_non_finite_threshold_is_refused() -> None:
    raw = Calibration(
        graph_sha256="a" * 64, operating_points=(POINT,), default_operating_point="coverage-0.9"
    ).to_dict()
    raw["operating_points"][0]["threshold"] = float("nan")
    with pytest.raises(CalibrationError, match="should be a finite number"):
        calibration_from_dict(raw)


def _with_risk_point(**fields: object) -> dict:
    """A calibration dict with POINT and one risk point carrying ``fields``."""
    risk = OperatingPoint(
        name="risk-0.02", method="risk", score="combined", threshold=0.7, target_risk=0.02, delta=0.05
    )
    raw = Calibration(
        graph_sha256="a" * 64, operating_points=(POINT, risk), default_operating_point="coverage-0.9"
    ).to_dict()
    raw["operating_points"][1].update(fields)
    return raw


def test_risk_method_is_read_and_checked() -> None:
    # an LTT point keeps its certificate; a risk point without risk_method (older files) loads too
    ltt = calibration_from_dict(_with_risk_point(risk_method="ltt", p_value=0.031))
    assert ltt.operating_point("risk-0.02").extra == {"risk_method": "ltt", "p_value": 0.031}
    assert "risk_method" not in calibration_from_dict(_with_risk_point()).operating_point("risk-0.02").extra
    with pytest.raises(CalibrationError, match=r"risk_method 'conformal'.*valid: one of \('sgr', 'ltt'\)"):
        calibration_from_dict(_with_risk_point(risk_method="conformal"))
    raw = _with_risk_point()
    raw["operating_points"][0]["risk_method"] = "ltt"  # on a coverage point
    with pytest.raises(CalibrationError, match="risk_method 'ltt' with method 'coverage'"):
        calibration_from_dict(raw)
