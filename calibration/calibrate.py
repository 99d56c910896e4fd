"""``abstain calibrate``: fit operating points on held-out labelled data against the served graph.

Flow: resolve ``MODEL_DIR`` → load ``model.onnx`` in ONNX Runtime (the service's own code,
:class:`abstain.runtime.OnnxModel`) → load and check the data → refuse the training split
(fingerprint recorded in the graph) → batched inference → the three scores and their AURC /
E-AURC / AUGRC → one sort of the chosen score → coverage points and risk points, certified by
Learn then Test or SGR (:mod:`abstain.thresholds`) → ``calibration.json`` next to the graph,
written atomically.

Default operating point: the first coverage point whose target is closest to 0.9 (the
serving default most operators ask for), else the first risk point that could be certified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from abstain.bounds import P_VALUES
from abstain.calibration.abstention_sets import SetSpec, fit_confidence, with_sets_and_estimate
from abstain.calibration.data_sources import LabelledSource, open_labelled_data
from abstain.calibration.per_class import per_class_point
from abstain.conformal import DEFAULT_SET_ALPHA, SET_METHODS
from abstain.contract import (
    CALIBRATION_FILENAME,
    DEFAULT_CANDIDATE_SCORES,
    META_TRAIN_DATA_FINGERPRINT,
    SCORE_NAMES,
    resolve_version_dir,
)
from abstain.datasets import ArraySplit
from abstain.operating_points import RISK_METHODS, Calibration, OperatingPoint, save_calibration
from abstain.risk_coverage import augrc, aurc, eaurc, risk_at_coverages, score_scale, selection_scores
from abstain.runtime import GraphOutputs, OnnxModel
from abstain.thresholds import (
    LTT_START_RULE,
    LttResult,
    RankedScores,
    RiskResult,
    coverage_point,
    ltt_point,
    sgr_point,
)
from abstain.version import code_version

#: Fewer calibration samples than this is refused: the 95 % interval of a coverage measured
#: on 30 samples is already about ±0.15 wide, and a threshold on fewer means little.
MIN_CALIBRATION_SAMPLES = 30
DEFAULT_COVERAGES = (0.8, 0.9, 0.95)
DEFAULT_DELTA = 0.05
#: How risk points are certified unless ``--method`` says otherwise (see docs/calibration.md).
DEFAULT_RISK_METHOD = "ltt"
DEFAULT_P_VALUE = "exact"
#: Abstentions get LAC sets at 90 % unless told otherwise: the smallest sets on average.
DEFAULT_SET_SPEC = SetSpec(method="lac", alpha=DEFAULT_SET_ALPHA)
#: The default operating point is the coverage point nearest this target.
PREFERRED_DEFAULT_COVERAGE = 0.9


@dataclass(frozen=True)
class Predictions:
    """Graph outputs on labelled data, ``labels`` ``[N]``, and ``errors`` ``[N]``: 0/1, argmax != label."""

    outputs: GraphOutputs
    errors: np.ndarray
    labels: np.ndarray

    def scores(self, name: str) -> np.ndarray:
        """Score ``name`` ``[N]``; ``selection`` is g's logit when the graph exports it."""
        return selection_scores(
            self.outputs.logits, self.outputs.selection, name, self.outputs.selection_logit
        )

    def scale(self, name: str) -> str:
        """``logit`` or ``probability``: what a threshold on score ``name`` means here."""
        return score_scale(name, self.outputs.selection_logit is not None)


def predict(model: OnnxModel, data: ArraySplit | LabelledSource, batch_size: int = 256) -> Predictions:
    """Batched inference through the service's code path; ``errors[i] = argmax != y[i]``.

    A :class:`~abstain.calibration.data_sources.LabelledSource` streams: its batches come already checked
    against the graph's input spec (the source was opened with it), each is run and dropped,
    and only the outputs (``[N, K]`` logits, ``[N]`` selection) are kept.
    """
    if isinstance(data, ArraySplit):
        outputs = model.run_batched(data.x, batch_size=batch_size)
    else:
        outputs = GraphOutputs.concat([model.run(x) for x in data.iter_batches(batch_size)])
        if outputs.logits.shape[0] != len(data):
            raise ValueError(f"{data.name}: {outputs.logits.shape[0]} outputs for {len(data)} labels")
    labels = np.asarray(data.y, dtype=np.int64)
    errors = (outputs.logits.argmax(axis=1) != labels).astype(np.int64)
    return Predictions(outputs=outputs, errors=errors, labels=labels)


def score_metrics(scores: np.ndarray, errors: np.ndarray) -> dict[str, Any]:
    """AURC, E-AURC, AUGRC and the paper's risk-at-coverage table for one score."""
    return {
        "aurc": aurc(scores, errors),
        "eaurc": eaurc(scores, errors),
        "augrc": augrc(scores, errors),
        "risk_at_coverage": risk_at_coverages(scores, errors),
    }


def _check_targets(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    for v in out:
        if math.isnan(v) or not 0.0 < v <= 1.0:
            raise ValueError(f"{name} targets should be in (0, 1], but got {v!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} targets should be distinct, but got {out}")
    return out


def _check_candidates(names: Sequence[str]) -> tuple[str, ...]:
    """The candidate scores in ``SCORE_NAMES`` order: known, at least one, none twice."""
    unknown = [n for n in names if n not in SCORE_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"candidate scores should be distinct names from {', '.join(SCORE_NAMES)}, "
            f"at least one, but got {', '.join(names) or 'none'}"
        )
    return tuple(s for s in SCORE_NAMES if s in names)


def point_name(method: str, target: float) -> str:
    """``coverage-0.9`` / ``risk-0.02``: the method and the target as written (``%g``)."""
    return f"{method}-{target:g}"


def choose_default(points: Sequence[OperatingPoint]) -> str:
    """First coverage point closest to 0.9, else the first (risk) point."""
    coverage = [p for p in points if p.method == "coverage"]
    if coverage:

        def distance(p: OperatingPoint) -> float:
            if p.target_coverage is None:
                raise ValueError(
                    f"coverage operating point {p.name!r} should have a target_coverage, but got None"
                )
            return abs(p.target_coverage - PREFERRED_DEFAULT_COVERAGE)

        # min() keeps the first of equals, so the order given on the command line breaks ties
        return min(coverage, key=distance).name
    return points[0].name


def _sgr_risk_point(
    ranked: RankedScores,
    target: float,
    delta: float,
    delta_per_score: float,
    score: str,
    scale: str,
    n: int,
    p_value: str,
) -> tuple[OperatingPoint | None, dict[str, Any] | None]:
    """SGR for one target: ``(operating point, None)`` when certified, else ``(None, unmet)``.

    ``p_value`` is LTT's and unused here (one signature for both methods).
    """
    res = sgr_point(ranked, target, delta_per_score)
    common = {
        "risk_method": "sgr",
        "n_probes": res.n_probes,
        "delta_per_score": delta_per_score,
        "delta_per_probe": res.delta_per_probe,
    }
    return _risk_outcome(
        res,
        target=target,
        delta=delta,
        score=score,
        scale=scale,
        common=common,
        certificate={"risk_bound": res.risk_bound},
        unmet_reason=lambda: (
            f"no threshold has a selective-risk bound <= {target:g} at confidence "
            f"{1.0 - delta:g} with these {n} samples (lowest bound reached: {res.best_bound:.4g})"
        ),
        unmet_evidence={"best_bound": res.best_bound},
    )


def _ltt_risk_point(
    ranked: RankedScores,
    target: float,
    delta: float,
    delta_per_score: float,
    score: str,
    scale: str,
    n: int,
    p_value: str,
) -> tuple[OperatingPoint | None, dict[str, Any] | None]:
    """Learn then Test (fixed sequence) for one target: ``(point, None)`` or ``(None, unmet)``.

    The p-value of the chosen threshold and the start rule's parameters are recorded, so the
    certificate can be checked from the file: ``p_value <= delta_per_score``.
    """
    res = ltt_point(ranked, target, delta_per_score, p_value)
    common = {
        "risk_method": "ltt",
        "p_value_method": res.p_value_method,
        "delta_per_score": delta_per_score,
        "start_rule": LTT_START_RULE,
        "start_min_selected": res.start_min_selected,
        "start_threshold": res.start_threshold,
        "n_tested": res.n_tested,
    }

    def unmet_reason() -> str:
        if res.start_p_value is None:
            return (
                f"fewer than {res.start_min_selected} samples ({n}): no threshold can show a selective "
                f"risk <= {target:g} at confidence {1.0 - delta:g}"
            )
        return (
            f"the first threshold tested (the {res.start_min_selected}+ highest scores) has "
            f"p-value {res.start_p_value:.4g} > {delta_per_score:.4g}: its errors do not show a "
            f"selective risk <= {target:g} at confidence {1.0 - delta:g}"
        )

    return _risk_outcome(
        res,
        target=target,
        delta=delta,
        score=score,
        scale=scale,
        common=common,
        certificate={"p_value": res.p_value},
        unmet_reason=unmet_reason,
        unmet_evidence={"start_p_value": res.start_p_value},
    )


def _risk_outcome(
    res: RiskResult | LttResult,
    *,
    target: float,
    delta: float,
    score: str,
    scale: str,
    common: dict[str, Any],
    certificate: dict[str, Any],
    unmet_reason: Callable[[], str],
    unmet_evidence: dict[str, Any],
) -> tuple[OperatingPoint | None, dict[str, Any] | None]:
    """One risk target's result as ``(operating point, None)`` when a threshold was certified,
    else ``(None, unmet)``; ``certificate`` (SGR's bound, LTT's p-value) and ``common`` (the
    method's parameters) go into the point's extra, ``unmet_evidence`` into the unmet entry."""
    name = point_name("risk", target)
    if res.threshold is not None:  # both results leave threshold None exactly when unmet
        extra = {"score_scale": scale, **certificate, "n_selected": res.n_selected, "n_errors": res.n_errors}
        point = OperatingPoint(
            name=name,
            method="risk",
            score=score,
            threshold=res.threshold,
            target_risk=target,
            delta=delta,
            coverage=res.coverage,
            risk=res.risk,
            extra={**extra, **common},
        )
        return point, None
    unmet = {
        "name": name,
        "method": "risk",
        "score": score,
        "target_risk": target,
        "delta": delta,
        "reason": unmet_reason(),
        **unmet_evidence,
        "samples_needed": res.samples_needed,
        **common,
    }
    return None, unmet


@dataclass(frozen=True)
class CalibrationRun:
    """What :func:`run_calibration` wrote, for the command line to report."""

    calibration: Calibration
    path: Path
    chosen_score: str
    n: int
    accuracy: float
    #: what the command should say beyond its tables (classes of a --per-class point never answered)
    notes: tuple[str, ...] = ()


def run_calibration(
    model_dir: Path,
    *,
    dataset: str | None = None,
    split: str = "val",
    data: Path | None = None,
    data_root: Path | None = None,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
    risks: Sequence[float] = (),
    delta: float = DEFAULT_DELTA,
    score: str | None = None,
    candidate_scores: Sequence[str] = DEFAULT_CANDIDATE_SCORES,
    batch_size: int = 256,
    risk_method: str = DEFAULT_RISK_METHOD,
    p_value: str = DEFAULT_P_VALUE,
    prediction_set: SetSpec | None = DEFAULT_SET_SPEC,
    per_class: bool = False,
) -> CalibrationRun:
    """Calibrate the graph in ``model_dir`` and write ``calibration.json`` next to it.

    Args:
        model_dir: ``models/<name>`` (latest version) or ``models/<name>/<version>``.
        dataset, split, data, data_root: the labelled held-out data (see
            :func:`abstain.calibration.data_sources.open_labelled_data`).
        coverages: target coverages in (0, 1] (SelectiveNet's calibration).
        risks: target selective risks in (0, 1] certified at confidence ``1 - delta``.
        delta: the risk points' failure probability, and ``1 - delta`` is the confidence of
            the Clopper–Pearson intervals reported for the coverage points.
        score: one of ``SCORE_NAMES``; default the one of ``candidate_scores`` with the lowest
            AURC on this data. That choice looks at the same data the risk points are then
            certified on, so each candidate's certificate gets ``delta / len(candidate_scores)``
            (recorded as ``delta_per_score`` in each risk point's extra): by the union bound the
            certificates of all candidate scores hold together with probability
            ``>= 1 - delta``, whichever is chosen. The same for SGR and LTT.
        candidate_scores: the scores the lowest AURC is chosen among when ``score`` is not given
            (default ``DEFAULT_CANDIDATE_SCORES``; the post-hoc ``margin`` and ``gini`` are
            opt-in: every candidate makes each certificate's share of ``delta`` smaller).
        risk_method: ``ltt`` (Learn then Test, fixed sequence: :func:`abstain.thresholds.ltt_point`)
            or ``sgr`` (Selection with Guaranteed Risk: :func:`abstain.thresholds.sgr_point`).
        p_value: LTT's p-value, ``exact`` (binomial tail) or ``hoeffding_bentkus``.
        prediction_set: the conformal set each point gives with its abstentions
            (:mod:`abstain.calibration.abstention_sets`); ``None``: no sets.
        per_class: every point class-conditional, a threshold per predicted class
            (:mod:`abstain.calibration.per_class`).

    Raises:
        ValueError: bad targets/delta/score, data problems, too few samples, the training
            split, or no operating point at all could be calibrated.
    """
    coverages = _check_targets(coverages, "coverage")
    risks = _check_targets(risks, "risk")
    if not coverages and not risks:
        raise ValueError("give at least one target: --coverage and/or --risk")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta should be in (0, 1), but got {delta!r}")
    if score is not None and score not in SCORE_NAMES:
        raise ValueError(f"score should be one of {', '.join(SCORE_NAMES)}, but got {score!r}")
    candidates = _check_candidates(candidate_scores)
    if risk_method not in RISK_METHODS:
        raise ValueError(f"risk method should be one of {', '.join(RISK_METHODS)}, but got {risk_method!r}")
    if p_value not in P_VALUES:
        raise ValueError(f"p-value should be one of {', '.join(P_VALUES)}, but got {p_value!r}")
    if prediction_set is not None and (
        prediction_set.method not in SET_METHODS or not 0.0 < prediction_set.alpha < 1.0
    ):
        raise ValueError(
            f"prediction sets should have a method in {SET_METHODS} and alpha in (0, 1), but got "
            f"{prediction_set.method!r} at alpha {prediction_set.alpha!r}"
        )

    version_dir = resolve_version_dir(Path(model_dir))
    model = OnnxModel(version_dir / "model.onnx")
    labelled = open_labelled_data(
        model.input_spec, model.class_names, dataset=dataset, split=split, data=data, data_root=data_root
    )
    n = len(labelled)
    if n < MIN_CALIBRATION_SAMPLES:
        raise ValueError(
            f"{labelled.name}: too few samples to calibrate ({n}); give at least {MIN_CALIBRATION_SAMPLES}"
        )

    def refuse_training_data(data_fp: str) -> None:
        if model.metadata.get(META_TRAIN_DATA_FINGERPRINT) == data_fp:
            raise ValueError(
                f"{labelled.name} is the graph's training data (same fingerprint {data_fp[:19]}…); "
                "calibrate on held-out data, e.g. --split val"
            )

    # pixels' hash for array data; the file list's for imagefolder, as training records it:
    # known before inference. An image directory's pixel hash is taken while its batches
    # stream through inference, so it is checked right after, before anything is written.
    if labelled.known_fingerprint is not None:
        refuse_training_data(labelled.known_fingerprint)
    preds = predict(model, labelled, batch_size)
    data_fp = labelled.fingerprint
    refuse_training_data(data_fp)
    # the default candidates are always reported, beside any others asked for
    reported = [s for s in SCORE_NAMES if s in {*DEFAULT_CANDIDATE_SCORES, *candidates, score}]
    per_score = {name: score_metrics(preds.scores(name), preds.errors) for name in reported}
    # lowest AURC wins; SCORE_NAMES order breaks exact ties (min keeps the first)
    chosen = score or min(candidates, key=lambda name: per_score[name]["aurc"])
    ranked = RankedScores.from_arrays(preds.scores(chosen), preds.errors)

    points: list[OperatingPoint] = []
    confidence = 1.0 - delta
    # thresholds on g's logit when the graph has it: exact where float32 g ties at 1.0
    scale = preds.scale(chosen)
    # a data-dependent choice among the candidate scores costs a share of delta (see Args)
    delta_per_score = delta if score else delta / len(candidates)
    unmet: list[dict[str, Any]] = []
    notes: list[str] = []
    if per_class:
        predicted = preds.outputs.logits.argmax(axis=1)
        for method, target in [*(("coverage", t) for t in coverages), *(("risk", t) for t in risks)]:
            point, class_notes = per_class_point(
                method=method, target=target, scores=preds.scores(chosen), errors=preds.errors,
                predicted=predicted, num_classes=preds.outputs.logits.shape[1], delta=delta,
                delta_per_score=delta_per_score, score=chosen, scale=scale, risk_method=risk_method,
                p_value=p_value,
            )  # fmt: skip
            label = f"{point_name(method, target)}-per-class"
            notes.extend(f"{label}: {note}" for note in class_notes)
            if point is not None:
                points.append(point)
            else:
                target_key = "target_coverage" if method == "coverage" else "target_risk"
                unmet.append({"name": label, "method": method, "score": chosen, target_key: target,
                              "delta": delta, "reason": "no class could be given a threshold",
                              "samples_needed": None})  # fmt: skip
    for target in [] if per_class else coverages:
        res = coverage_point(ranked, target, confidence)
        points.append(
            OperatingPoint(
                name=point_name("coverage", target),
                method="coverage",
                score=chosen,
                threshold=res.threshold,
                target_coverage=target,
                delta=delta,
                coverage=res.coverage,
                risk=res.risk,
                extra={
                    "score_scale": scale,
                    "coverage_interval": list(res.coverage_interval),
                    "risk_interval": list(res.risk_interval),
                    "confidence": confidence,
                    "n_selected": res.n_selected,
                    "n_errors": res.n_errors,
                },
            )
        )
    for target in [] if per_class else risks:
        certify = _ltt_risk_point if risk_method == "ltt" else _sgr_risk_point
        point, missed = certify(ranked, target, delta, delta_per_score, chosen, scale, n, p_value)
        if point is not None:
            points.append(point)
        if missed is not None:
            unmet.append(missed)
    if not points:
        raise ValueError(
            "no operating point could be calibrated: "
            + "; ".join(
                f"{u['name']}: {u['reason']}"
                + (
                    f"; at least {u['samples_needed']} answered samples with zero errors would be needed"
                    if u["samples_needed"] is not None
                    else ""
                )
                for u in unmet
            )
        )

    temperature = fit_confidence(preds.outputs, preds.labels)
    points = [
        with_sets_and_estimate(p, preds.outputs, preds.labels, temperature, prediction_set) for p in points
    ]
    calibration = Calibration(
        graph_sha256=model.sha256,
        operating_points=tuple(points),
        default_operating_point=choose_default(points),
        code_version=code_version(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data={
            "source": labelled.name,
            "fingerprint": data_fp,
            "size": n,
            "accuracy": float(1.0 - preds.errors.mean()),
            "score": chosen,
            "score_choice": "given" if score else "lowest AURC",
            "candidate_scores": [score] if score else list(candidates),
            "delta_per_score": delta_per_score,
        },
        scores=per_score,
        unmet_targets=tuple(unmet),
        confidence_calibration=temperature.to_dict(),
    )
    path = version_dir / CALIBRATION_FILENAME
    save_calibration(path, calibration)
    return CalibrationRun(
        calibration=calibration,
        path=path,
        chosen_score=chosen,
        n=n,
        accuracy=float(1.0 - preds.errors.mean()),
        notes=tuple(notes),
    )
