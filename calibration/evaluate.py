"""``abstain evaluate``: what the calibrated operating points do on test data.

Writes ``DIR/evaluation.json`` and ``DIR/risk_coverage.png``:

* per operating point: ``name``, ``target_coverage`` or ``target_risk``, ``realized_coverage``,
  ``selective_risk`` (null when nothing is answered), ``guarantee_held``, and context
  (``method``, ``score``, ``threshold``, ``n_selected``, the calibration-time interval/bound);
* per score: ``aurc``, ``eaurc``, ``augrc`` and ``risk_at_coverage`` at the paper's table
  coverages 100 … 70 %.

``check`` names what was tested and ``check_passed`` is its outcome (``guarantee_held``, its
older name, carries the same value for existing readers):

* risk points (``check: "risk not shown above target"``): the test errors do not show, by a
  one-sided exact binomial test at the point's ``δ`` (:func:`abstain.bounds.risk_exceeds_target`),
  that the selective risk is above ``target_risk``. SGR promises the *population* risk is
  ``<= target`` with probability ``1 - δ``; a finite test set's risk scatters around it, so
  "test risk <= target" would fail about half the time for a true risk just below the target,
  while this test fails at most ``δ`` of the time when the promise holds.
* coverage points (``check: "coverage in prediction interval"``): the realised coverage lies
  inside ``coverage_prediction_interval``, the ``1 - δ`` interval for the coverage of a *new*
  sample of this size (:func:`abstain.bounds.coverage_prediction_interval`, beta-binomial:
  it carries the spread of both the calibration and the test sample, so with exchangeable
  data it fails at most ``δ`` of the time). Coverage points promise no guarantee; the
  calibration-time Clopper–Pearson interval (a statement about the population coverage) is
  kept as ``coverage_interval`` for reference but is not the check: a test coverage leaves it
  far more often than ``δ``. A calibration file without ``n_selected`` or the calibration
  size (written by hand) falls back to that interval, and ``check`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abstain.bounds import coverage_prediction_interval, risk_exceeds_target
from abstain.calibration.calibrate import Predictions, predict, score_metrics
from abstain.calibration.data_sources import open_labelled_data
from abstain.contract import (
    CALIBRATION_FILENAME,
    EVALUATION_FILENAME,
    MODEL_FILENAME,
    SCORE_NAMES,
    resolve_version_dir,
)
from abstain.decisions import class_thresholds
from abstain.io import atomic_write_json, atomic_writer
from abstain.operating_points import (
    Calibration,
    OperatingPoint,
    check_score_scale,
    load_calibration,
    verify_graph,
)
from abstain.risk_coverage import coverage_and_risk, risk_coverage_curve
from abstain.runtime import OnnxModel
from abstain.version import code_version

PLOT_FILENAME = "risk_coverage.png"


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _class_row(
    k: int, scores: np.ndarray, errors: np.ndarray, mine: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Class ``k``'s realized coverage and risk among the samples predicted as it (``mine``)."""
    cov, risk, n_sel = (
        coverage_and_risk(scores[mine], errors[mine], threshold) if mine.any() else (math.nan, math.nan, 0)
    )
    return {"class_index": k, "n": int(mine.sum()), "realized_coverage": _nan_to_none(cov),
            "selective_risk": _nan_to_none(risk), "n_selected": n_sel}  # fmt: skip


def evaluate_point(
    point: OperatingPoint, preds: Predictions, n_calibration: int | None = None
) -> dict[str, Any]:
    """One operating point's row of ``evaluation.json`` on these predictions.

    ``n_calibration``: the calibration set's size (``calibration.data["size"]``), needed for
    a coverage point's prediction interval.
    """
    per_class = class_thresholds(point)
    predicted = preds.outputs.logits.argmax(axis=1)
    # a class-conditional point holds each sample to its predicted class's threshold
    held_to = point.threshold if per_class is None else per_class[predicted]
    cov, risk, n_sel = coverage_and_risk(preds.scores(point.score), preds.errors, held_to)
    row: dict[str, Any] = {
        "name": point.name,
        "method": point.method,
        "score": point.score,
        "threshold": point.threshold,
    }
    if point.method == "risk":
        if point.target_risk is None:
            raise ValueError(f"risk operating point {point.name!r} should have a target_risk, but got None")
        row["target_risk"] = point.target_risk
        row["check"] = "risk not shown above target"
        delta = float(point.delta or 0.05)
        # nothing answered → nothing wrong: the risk promise holds vacuously
        n_err = 0 if n_sel == 0 else round(risk * n_sel)
        held = n_sel == 0 or not risk_exceeds_target(n_err, n_sel, float(point.target_risk), delta)
        row["risk_bound"] = point.extra.get("risk_bound")
        row["test_delta"] = delta
    else:
        row["target_coverage"] = point.target_coverage
        lo, hi = point.extra.get("coverage_interval", (point.coverage, point.coverage))
        row["coverage_interval"] = [lo, hi]
        m_cal, confidence = point.extra.get("n_selected"), 1.0 - float(point.delta or 0.05)
        if isinstance(m_cal, int) and isinstance(n_calibration, int) and 0 <= m_cal <= n_calibration:
            lo, hi = coverage_prediction_interval(m_cal, n_calibration, preds.errors.size, confidence)
            row["check"] = "coverage in prediction interval"
            row["coverage_prediction_interval"] = [lo, hi]
            row["prediction_confidence"] = confidence
        else:
            row["check"] = "coverage in calibration interval (calibration file lacks n_selected or size)"
        held = bool(lo <= cov <= hi)
    row.update(
        {
            "realized_coverage": cov,
            "selective_risk": _nan_to_none(risk),
            "check_passed": bool(held),
            "guarantee_held": bool(held),  # check_passed's older name, kept for existing readers
            "n_selected": n_sel,
            "calibration_coverage": point.coverage,
            "calibration_risk": point.risk,
        }
    )
    if per_class is not None:  # what each class got on this data (the checks above are overall)
        scores = preds.scores(point.score)
        row["per_class"] = [
            _class_row(k, scores, preds.errors, predicted == k, per_class[k])
            for k in range(per_class.shape[0])
        ]
    return row


def plot_risk_coverage(path: Path, preds: Predictions, rows: list[dict[str, Any]], title: str) -> None:
    """Risk–coverage curves of every score, operating points marked; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a container or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in SCORE_NAMES:
        coverages, risks, _ = risk_coverage_curve(preds.scores(name), preds.errors)
        ax.step(coverages, risks, where="post", label=name, linewidth=1.2)
    marked = [row for row in rows if row["selective_risk"] is not None]
    for i, row in enumerate(marked):
        marker = "o" if row["method"] == "coverage" else "s"
        ax.plot(row["realized_coverage"], row["selective_risk"], marker, color="black", markersize=5)
        # operating points often sit close together near full coverage: stagger the labels
        # vertically and draw a leader line so that each name stays readable
        ax.annotate(
            row["name"],
            (row["realized_coverage"], row["selective_risk"]),
            textcoords="offset points",
            xytext=(-60, 12 + 12 * i),
            fontsize=7,
            arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6},
        )
    ax.set_xlabel("coverage (fraction answered)")
    ax.set_ylabel("selective risk (error on answered)")
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(bottom=0.0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    with atomic_writer(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


@dataclass(frozen=True)
class EvaluationRun:
    """What :func:`run_evaluation` wrote."""

    report: dict[str, Any]
    json_path: Path
    plot_path: Path


def run_evaluation(
    model_dir: Path,
    out_dir: Path,
    *,
    dataset: str | None = None,
    split: str = "test",
    data: Path | None = None,
    data_root: Path | None = None,
    batch_size: int = 256,
) -> EvaluationRun:
    """Evaluate the calibrated graph in ``model_dir`` on labelled data; write JSON and PNG to ``out_dir``.

    Raises ``CalibrationError`` (a ``ValueError``) when ``calibration.json`` is missing or was
    fitted on another graph, and ``ValueError`` for data problems.
    """
    version_dir = resolve_version_dir(Path(model_dir))
    graph = version_dir / MODEL_FILENAME
    calibration: Calibration = load_calibration(version_dir / CALIBRATION_FILENAME)
    model = OnnxModel(graph)
    verify_graph(calibration, graph, model.sha256)
    check_score_scale(calibration, model.has_selection_logit, str(version_dir / CALIBRATION_FILENAME))
    labelled = open_labelled_data(
        model.input_spec, model.class_names, dataset=dataset, split=split, data=data, data_root=data_root
    )  # image files stream in batches
    preds = predict(model, labelled, batch_size)
    n_calibration = calibration.data.get("size")
    rows = [evaluate_point(p, preds, n_calibration) for p in calibration.operating_points]
    data_fp = labelled.fingerprint
    warnings = []
    if data_fp == calibration.data.get("fingerprint"):
        warnings.append("the evaluation data is the calibration data: these numbers are optimistic")
    report = {
        "graph_sha256": model.sha256,
        "code_version": code_version(),
        "data": {
            "source": labelled.name,
            "fingerprint": data_fp,
            "size": len(labelled),
            "accuracy": float(1.0 - preds.errors.mean()),
        },
        "calibration_data": calibration.data,
        "default_operating_point": calibration.default_operating_point,
        "operating_points": rows,
        "scores": {name: score_metrics(preds.scores(name), preds.errors) for name in SCORE_NAMES},
        "warnings": warnings,
    }
    out_dir = Path(out_dir)
    json_path, plot_path = out_dir / EVALUATION_FILENAME, out_dir / PLOT_FILENAME
    atomic_write_json(json_path, report)
    title = f"{version_dir.parent.name}/{version_dir.name} on {labelled.name} (n={len(labelled)})"
    plot_risk_coverage(plot_path, preds, rows, title)
    return EvaluationRun(report=report, json_path=json_path, plot_path=plot_path)
