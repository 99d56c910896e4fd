"""``calibration.json``: the schema, reading with validation, atomic writing.

A calibration is bound to one exact graph by the graph's sha256; the service refuses to
serve a graph whose hash differs. Schema (version 1)::

    {
      "schema_version": 1,
      "graph_sha256": "<hex sha256 of model.onnx>",
      "code_version": "0.1.0+g1234abc",
      "created_at": "2026-11-22T13:00:00+00:00",
      "data": {"source": "digits/val", "fingerprint": "sha256:...", "size": 359},
      "scores": {"selection": {"aurc": 0.01, ...}, "softmax_response": {...}, "combined": {...}},
      "operating_points": [
        {"name": "coverage-0.9", "method": "coverage", "score": "selection",
         "threshold": 0.73, "target_coverage": 0.9, "target_risk": null, "delta": 0.05,
         "coverage": 0.9, "coverage_interval": [0.86, 0.93],
         "risk": 0.012, "risk_interval": [0.004, 0.03], "n_selected": 323},
        {"name": "risk-0.02", "method": "risk", ..., "target_risk": 0.02, "delta": 0.05,
         "risk_method": "sgr", "risk_bound": 0.019, ...},
        {"name": "risk-0.01", "method": "risk", ..., "risk_method": "ltt", "p_value": 0.04, ...}
      ],
      "default_operating_point": "coverage-0.9",
      "confidence_calibration": {"method": "temperature", "temperature": 1.4, "nll": 0.21, ...},
      "unmet_targets": [
        {"name": "risk-0.001", "method": "risk", "target_risk": 0.001, "delta": 0.05,
         "reason": "no threshold meets the target ...", "samples_needed": 26000, ...}
      ]
    }

A risk point says how its threshold was certified in ``risk_method``: ``"sgr"`` (Selection
with Guaranteed Risk: ``risk_bound``, ``n_probes``, ``delta_per_probe``) or ``"ltt"`` (Learn
then Test, fixed sequence: ``p_value`` of the chosen threshold, ``p_value_method``,
``start_rule``, ``start_min_selected``, ``start_threshold``, ``n_tested``); both record
``delta_per_score``. ``method`` stays ``"risk"`` for both — what a point promises, not how it
was found — so every reader that only needs score and threshold (the service, ``evaluate``,
the selective graph) is unchanged, and a risk point without ``risk_method`` (files written
before it existed) is SGR.

Each operating point may carry ``score_scale``: ``"logit"`` when its ``selection`` threshold is
on g's logit (graphs with the ``selection_logit`` output), else ``"probability"`` — the value
assumed when the field is absent (files written before it existed).

Each operating point may carry ``prediction_set`` (:mod:`abstain.conformal`): the conformal set
given with each of its abstentions — ``{"method": "lac" | "aps", "alpha": 0.1, "quantile": q,
"n_calibration": ..., "coverage": ..., "mean_size": ...}``, ``quantile`` ``null`` when too few
calibration samples were abstained on (the set is then every class) — and ``estimated_risk``,
the label-free estimate of its selective risk on the calibration data
(:mod:`abstain.temperature`), beside the measured ``risk``. ``confidence_calibration``
(optional) holds the temperature that makes the softmax calibrated, which the service uses for
its label-free live-risk gauge.

A class-conditional point (``abstain calibrate --per-class``) carries ``class_thresholds``, one
threshold per class (``null``: that class is never answered): a sample is held to its predicted
class's threshold, and ``threshold`` is the lowest of them (:mod:`abstain.calibration.per_class`).

A sample is answered iff ``score(sample) >= threshold``. ``unmet_targets`` (optional, may be
empty) lists requested risk targets that SGR or LTT could not certify with the data given: they
have no threshold and are not operating points.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from abstain.conformal import SET_METHODS
from abstain.contract import (
    CALIBRATION_SCHEMA_VERSION,
    SCORE_NAMES,
    SCORE_SCALE_LOGIT,
    SCORE_SCALE_PROBABILITY,
    SCORE_SELECTION,
)
from abstain.io import atomic_write_json, sha256_file
from abstain.risk_coverage import score_scale

METHODS = ("coverage", "risk")
#: How a risk point was certified; absent means ``"sgr"`` (calibrations older than the field).
RISK_METHODS = ("sgr", "ltt")


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or belongs to another graph."""


@dataclass(frozen=True)
class OperatingPoint:
    """One named threshold and what calibration measured for it.

    ``extra`` keeps any further measured fields (intervals, bounds, sample counts) verbatim.
    """

    name: str
    method: str  # "coverage" | "risk"
    score: str  # one of SCORE_NAMES
    threshold: float
    target_coverage: float | None = None
    target_risk: float | None = None
    delta: float | None = None
    coverage: float | None = None  # measured on the calibration data
    risk: float | None = None  # measured selective risk on the calibration data
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        names = set(cls.__dataclass_fields__) - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class Calibration:
    """The parsed contents of a ``calibration.json``."""

    graph_sha256: str
    operating_points: tuple[OperatingPoint, ...]
    default_operating_point: str
    schema_version: int = CALIBRATION_SCHEMA_VERSION
    code_version: str = ""
    created_at: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    unmet_targets: tuple[dict[str, Any], ...] = ()
    #: how the softmax was calibrated (``{"method": "temperature", "temperature": T, ...}``); may be empty
    confidence_calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def temperature(self) -> float | None:
        """The fitted softmax temperature, or ``None`` (calibrations older than the field)."""
        value = self.confidence_calibration.get("temperature")
        return None if value is None else float(value)

    def operating_point(self, name: str | None = None) -> OperatingPoint:
        """The named operating point (the default when ``name`` is None)."""
        wanted = self.default_operating_point if name is None else name
        for point in self.operating_points:
            if point.name == wanted:
                return point
        raise KeyError(f"unknown operating point {wanted!r}; valid: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.operating_points]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "graph_sha256": self.graph_sha256,
            "code_version": self.code_version,
            "created_at": self.created_at,
            "data": self.data,
            "scores": self.scores,
            "operating_points": [p.to_dict() for p in self.operating_points],
            "default_operating_point": self.default_operating_point,
            "confidence_calibration": self.confidence_calibration,
            "unmet_targets": list(self.unmet_targets),
        }


def _validate_point(raw: Any, where: str) -> OperatingPoint:
    if not isinstance(raw, dict):
        raise CalibrationError(f"{where}: each operating point should be an object, but got {raw!r}")
    for key in ("name", "method", "score", "threshold"):
        if key not in raw:
            raise CalibrationError(f"{where}: operating point {raw.get('name', '?')!r} lacks {key!r}")
    if raw["method"] not in METHODS:
        raise CalibrationError(
            f"{where}: operating point {raw['name']!r} has method {raw['method']!r}; valid: {METHODS}"
        )
    if raw["score"] not in SCORE_NAMES:
        raise CalibrationError(
            f"{where}: operating point {raw['name']!r} has score {raw['score']!r}; valid: {SCORE_NAMES}"
        )
    if "risk_method" in raw and (raw["method"] != "risk" or raw["risk_method"] not in RISK_METHODS):
        raise CalibrationError(
            f"{where}: operating point {raw['name']!r} has risk_method {raw['risk_method']!r} "
            f"with method {raw['method']!r}; valid: one of {RISK_METHODS} on a 'risk' point"
        )
    scale = raw.get("score_scale", SCORE_SCALE_PROBABILITY)
    if scale not in (SCORE_SCALE_LOGIT, SCORE_SCALE_PROBABILITY) or (
        scale == SCORE_SCALE_LOGIT and raw["score"] != SCORE_SELECTION
    ):
        raise CalibrationError(
            f"{where}: operating point {raw['name']!r} has score_scale {scale!r}; valid: "
            f"{SCORE_SCALE_PROBABILITY!r} for any score, {SCORE_SCALE_LOGIT!r} for {SCORE_SELECTION!r}"
        )
    if "prediction_set" in raw:
        _validate_prediction_set(raw["prediction_set"], f"{where}: operating point {raw['name']!r}")
    if "class_thresholds" in raw:
        values = raw["class_thresholds"]
        if (
            not isinstance(values, list)
            or len(values) < 2
            or not all(v is None or _is_number(v) for v in values)
            or all(v is None for v in values)
        ):
            raise CalibrationError(
                f"{where}: operating point {raw['name']!r} has class_thresholds {values!r}; valid: a "
                "list with one finite number (or null: never answered) per class, not all null"
            )
    threshold = raw["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise CalibrationError(
            f"{where}: threshold of {raw['name']!r} should be a finite number, got {threshold!r}"
        )
    return OperatingPoint.from_dict(raw)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _validate_prediction_set(raw: Any, where: str) -> None:
    """A point's ``prediction_set``: a known method, ``alpha`` in (0, 1), a finite or null quantile."""
    if (
        not isinstance(raw, dict)
        or raw.get("method") not in SET_METHODS
        or not _is_number(raw.get("alpha"))
        or not 0 < raw["alpha"] < 1
        or not (raw.get("quantile") is None or _is_number(raw["quantile"]))
    ):
        raise CalibrationError(
            f"{where} has prediction_set {raw!r}; valid: an object with method one of {SET_METHODS}, "
            "alpha in (0, 1) and quantile a finite number or null"
        )


def _validate_confidence_calibration(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == {}:  # absent: calibrations older than the field
        return {}
    temperature: Any = raw.get("temperature") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not _is_number(temperature) or temperature <= 0:
        raise CalibrationError(
            f"{where}: confidence_calibration should be an object with a positive finite "
            f"temperature, but got {raw!r}"
        )
    return dict(raw)


def calibration_from_dict(raw: Any, where: str = "calibration") -> Calibration:
    """Validate a parsed JSON object; ``CalibrationError`` names the first problem found."""
    if not isinstance(raw, dict):
        raise CalibrationError(f"{where}: expected a JSON object, but got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != CALIBRATION_SCHEMA_VERSION:
        raise CalibrationError(
            f"{where}: schema_version should be {CALIBRATION_SCHEMA_VERSION}, but got {version!r}"
        )
    sha = raw.get("graph_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise CalibrationError(f"{where}: graph_sha256 should be a 64-character hex digest, got {sha!r}")
    points_raw = raw.get("operating_points")
    if not isinstance(points_raw, list) or not points_raw:
        raise CalibrationError(f"{where}: operating_points should be a non-empty list")
    points = tuple(_validate_point(p, where) for p in points_raw)
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise CalibrationError(f"{where}: operating point names should be unique, got {names}")
    default = raw.get("default_operating_point")
    if default not in names:
        raise CalibrationError(
            f"{where}: default_operating_point {default!r} is not one of the operating points {names}"
        )
    unmet = raw.get("unmet_targets") or []
    if not isinstance(unmet, list) or not all(isinstance(u, dict) for u in unmet):
        raise CalibrationError(f"{where}: unmet_targets should be a list of objects, got {unmet!r}")
    return Calibration(
        graph_sha256=sha,
        operating_points=points,
        default_operating_point=default,
        schema_version=version,
        code_version=str(raw.get("code_version", "")),
        created_at=str(raw.get("created_at", "")),
        data=dict(raw.get("data") or {}),
        scores=dict(raw.get("scores") or {}),
        unmet_targets=tuple(unmet),
        confidence_calibration=_validate_confidence_calibration(raw.get("confidence_calibration"), where),
    )


def load_calibration(path: Path) -> Calibration:
    """Read and validate ``calibration.json``; ``CalibrationError`` says what is wrong and how to fix it."""
    path = Path(path)
    fix = f"create it with: abstain calibrate {path.parent.parent} --dataset ... --split val"
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} is missing; {fix}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"calibration file {path} is not valid JSON ({exc}); {fix}") from exc
    return calibration_from_dict(raw, where=str(path))


def verify_graph(calibration: Calibration, graph_path: Path, graph_sha256: str | None = None) -> str:
    """Check that ``calibration`` was fitted on the graph at ``graph_path``; return the graph's sha256.

    Raises ``CalibrationError`` if the hashes differ: thresholds of one graph mean nothing
    for another, so serving such a pair would silently break the promised coverage/risk.
    """
    actual = graph_sha256 or sha256_file(graph_path)
    if actual != calibration.graph_sha256:
        raise CalibrationError(
            f"calibration is for another graph: it records sha256 {calibration.graph_sha256[:12]}…, "
            f"but {graph_path} has sha256 {actual[:12]}…; re-run `abstain calibrate` on this model "
            "directory (or restore the graph it was fitted on)"
        )
    return actual


def check_score_scale(calibration: Calibration, has_selection_logit: bool, where: str) -> None:
    """Refuse (``CalibrationError``) a calibration whose thresholds are on another scale than the
    scores this graph gives: a logit threshold (a graph with ``selection_logit``) compared with
    g in [0, 1], or the reverse, would answer everything or nothing.

    ``score_scale`` absent means ``probability`` (calibration files older than the field).
    """
    for point in calibration.operating_points:
        recorded = point.extra.get("score_scale", SCORE_SCALE_PROBABILITY)
        expected = score_scale(point.score, has_selection_logit)
        if recorded != expected:
            raise CalibrationError(
                f"{where}: operating point {point.name!r} has a threshold on the {recorded} scale, "
                f"but this graph's {point.score!r} score is on the {expected} scale; re-run "
                "`abstain calibrate` on this graph"
            )


def save_calibration(path: Path, calibration: Calibration) -> None:
    """Validate, then write atomically."""
    data = calibration.to_dict()
    calibration_from_dict(json.loads(json.dumps(data)), where=str(path))
    atomic_write_json(Path(path), data)
