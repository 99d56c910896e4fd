"""Prometheus metrics of the predict-or-abstain service (names are a contract with ``deploy/``).

=====================================  =========  ===============================================
name                                   type       labels
=====================================  =========  ===============================================
``abstain_decisions_total``            counter    model, version, operating_point, decision
``abstain_selection_score``            histogram  model, version, score (probability scale)
``abstain_selection_logit_score``      histogram  model, version, score (logit scale)
``abstain_target_coverage``            gauge      model, version, operating_point
``abstain_abstention_rate``            gauge      model, version, operating_point
``abstain_estimated_risk``             gauge      model, version, operating_point
``abstain_class_decisions_total``      counter    model, version, operating_point, class_index, decision
``abstain_inference_seconds``          histogram  model, version, backend
``abstain_batch_size``                 histogram  model, version
``abstain_rejected_inputs_total``      counter    model, version, reason
``abstain_backend_errors_total``       counter    model, version, backend
``abstain_internal_errors_total``      counter    model, version
=====================================  =========  ===============================================

``abstain_selection_score`` records, for each decided image, the score its operating point
thresholds (``score`` = ``selection`` for g, ``softmax_response`` or ``combined``): drift is
watched on the number that decides, not on g when g decides nothing.

One histogram per score *scale*, each score on its own scale. A point's scale is the
``score_scale`` its calibration records (``abstain.contract.SCORE_SCALE_*``; the service has
already checked it against the graph, ``abstain.operating_points.check_score_scale``):

* ``probability`` (every score in [0, 1], and ``selection`` = g on a graph without
  ``selection_logit``): ``abstain_selection_score``, edges :data:`SELECTION_BUCKETS`;
* ``logit`` (``selection`` = g's logit z on a graph with ``selection_logit``, unbounded):
  ``abstain_selection_logit_score``, edges :data:`LOGIT_BUCKETS`.

Two metrics rather than one with a ``scale`` label, because a histogram's edges are per metric,
and not ``sigmoid(z)`` in the probability histogram, because the logit is served exactly where g
saturates (float32 g is 1.0 from z ≈ 17): those images would all land in the top bucket.

A ``prometheus_client`` histogram has one bucket list for all its label values, so a histogram's
edges are its fixed edges plus the calibrated threshold of *every* operating point on its scale
(:func:`score_buckets`): bucket ``le="<threshold>"`` counts the scores ``<= threshold``, so the
mass crossing a threshold shows as a change of that bucket's share (up to scores exactly at the
threshold, which are answered; ``abstain_decisions_total`` counts the decisions exactly). The
edges thus depend on the calibration: compare ``le`` series within one model version. Logit
scores and edges may be negative, so, as OpenMetrics asks, ``prometheus_client`` exposes no
``_sum`` for the logit histogram (BentoML's multi-worker merge does, and it may fall, which
Prometheus reads as a reset): read it from its buckets and ``_count``.

``abstain_estimated_risk`` is the label-free estimate of the live selective risk
(:mod:`abstain.temperature`): the mean of ``1 - p`` over this worker's last N *answered*
decisions, ``p`` the temperature-scaled softmax probability of the answer (the temperature
fitted by ``abstain calibrate``). It is there before any label arrives and rests on one
assumption: the probabilities are as calibrated on live traffic as on the calibration data
(docs/serving.md, "Is it still right?"). NaN before the first answer; absent for a calibration
without a temperature (files older than it). ``AbstainEstimatedRiskAboveCalibrated``
(deploy/prometheus/rules.yml) compares it with ``abstain_calibrated_risk``.

``abstain_class_decisions_total`` counts the decisions of a class-conditional operating point
(``abstain calibrate --per-class``) by predicted class, so that a class answered far less (or
more) than calibrated shows. Only for models of at most :data:`MAX_CLASS_LABELS` classes: each
class multiplies the series of every such point by two, and Prometheus pays for every series.

A backend failure (Triton down or past its timeout, an ONNX Runtime error) is not a fault of
the client's input, so it is not a rejected input: it has its own counter, and the request
is answered 503 ``backend_unavailable``. A bug in the service's own code is neither: it is
answered 500 ``internal_error``, logged with its traceback, and counted apart.

Multi-worker mode: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker before it builds
the service, and its ``/metrics`` merges every worker's files. ``prometheus_client`` picks its
value store when first imported, so this module imports it only inside
:class:`ServiceMetrics` (built in the service's ``__init__``, i.e. inside the worker);
metrics created at import time would never reach ``/metrics``. Counters and histograms sum
across workers. Gauges use ``multiprocess_mode="mostrecent"``: the target coverage is the
same in every worker, and the rolling abstention rate is the window of whichever worker
decided last — each worker keeps its own window of the last N decisions, and with the
load balanced over workers any one window estimates the same rate. For the exact fleet-wide
rate use ``rate(abstain_decisions_total{decision="abstain"}[5m]) / rate(abstain_decisions_total[5m])``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import numpy as np

from abstain.contract import SCORE_SCALE_LOGIT, SCORE_SCALE_PROBABILITY
from abstain.operating_points import Calibration

#: Why an input is rejected: the ``reason`` of an :class:`~abstain.serving.http.validation.InputRejectedError`
#: and of its 4xx answer, and the label values of ``abstain_rejected_inputs_total``.
RejectReason = Literal[
    "bad_shape",
    "bad_dtype",
    "non_finite",
    "out_of_range",
    "empty_batch",
    "batch_too_large",
    "bad_image",
    "unknown_operating_point",
    "bad_json",
    "bad_npy",
    "bad_request_id",
]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
#: 0.05, 0.10, …, 0.95, then finer towards 1: a confident model's thresholds sit there (the
#: embedded digits model's are above 0.98), and drift shows first as mass leaving the top buckets
SELECTION_BUCKETS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.975, 0.99, 0.995, 0.999, 1.0)
#: Edges of logit scores z (g = sigmoid(z)), symmetric around 0: steps of 0.5 up to ±3 (≈ the
#: logits of 0.05 and 0.95), then of 1 up to ±8 (±4.6 ≈ 0.99, ±6.9 ≈ 0.999), then coarser to ±40:
#: float32 g rounds to 1.0 from z ≈ 17 (what the logit is for), float64 from z ≈ 37
_LOGIT_EDGES = (0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40)
LOGIT_BUCKETS = tuple(float(e) for e in (*(-e for e in reversed(_LOGIT_EDGES)), 0, *_LOGIT_EDGES))
#: The score histogram of each score scale: its metric name and fixed edges.
SCORE_HISTOGRAMS = {
    SCORE_SCALE_PROBABILITY: ("abstain_selection_score", SELECTION_BUCKETS),
    SCORE_SCALE_LOGIT: ("abstain_selection_logit_score", LOGIT_BUCKETS),
}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def point_scale(point: Any) -> str:
    """The scale of an operating point's threshold (``score_scale`` in its extra fields;
    ``probability`` when absent, as in calibration files older than the logit output)."""
    return str(getattr(point, "extra", {}).get("score_scale", SCORE_SCALE_PROBABILITY))


def score_buckets(fixed: Iterable[float], thresholds: Iterable[float]) -> tuple[float, ...]:
    """Sorted edges: ``fixed`` with every finite threshold added (each edge once; +Inf is
    added by ``prometheus_client``)."""
    edges = {float(b) for b in fixed} | {float(t) for t in thresholds if math.isfinite(float(t))}
    return tuple(sorted(edges))


def observe_many(histogram: Any, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, with one increment per bucket hit.

    prometheus_client observes one value per call, each taking two locks and (multiprocess mode,
    as under BentoML) two mmap writes, on the event loop (docs/benchmarks.md). This counts the
    values per bucket with numpy and increments each bucket once, through the same child
    attributes ``Histogram.observe`` uses (``_upper_bounds``, ``_buckets``, ``_sum``);
    tests/serving/test_score_metrics.py checks the exposition equals one ``observe`` per value.
    A few values go through ``observe`` itself (the numpy calls would cost more).
    """
    values = np.asarray(values, dtype=float).reshape(-1)
    if len(values) <= 4:
        for value in values.tolist():
            histogram.observe(value)
        return
    # the bucket observe() picks: the first upper bound >= value (NaN: none, as in observe())
    bucket = np.searchsorted(histogram._upper_bounds, values, side="left")
    index, counts = np.unique(bucket, return_counts=True)
    histogram._sum.inc(float(values.sum()))
    for i, count in zip(index.tolist(), counts.tolist(), strict=True):
        if i < len(histogram._buckets):
            histogram._buckets[i].inc(count)


class RollingRate:
    """Fraction of ``True`` among the last ``window`` observations (0.0 before any)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window should be a positive number of decisions, but got {window}")
        self._items: deque[bool] = deque(maxlen=window)
        self._true = 0

    def extend(self, flags: Iterable[bool]) -> float:
        for flag in flags:
            if len(self._items) == self._items.maxlen:
                self._true -= self._items[0]  # the oldest falls out of the window
            self._items.append(bool(flag))
            self._true += bool(flag)
        return self.value

    @property
    def value(self) -> float:
        return self._true / len(self._items) if self._items else 0.0


#: The most classes a model may have for per-class decision counts (series = classes x 2 per point).
MAX_CLASS_LABELS = 20


class RollingMean:
    """Mean of the last ``window`` observed values (NaN before any)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window should be a positive number of decisions, but got {window}")
        self._items: deque[float] = deque(maxlen=window)
        self._sum = 0.0

    def extend(self, values: Iterable[float]) -> float:
        for value in values:
            if len(self._items) == self._items.maxlen:
                self._sum -= self._items[0]  # the oldest falls out of the window
            self._items.append(value)
            self._sum += value
        return self.value

    @property
    def value(self) -> float:
        # a running sum: each step's rounding (~1e-16) is far below what the gauge means; clamped
        # at 0 so that rounding never shows a negative risk
        return max(self._sum, 0.0) / len(self._items) if self._items else math.nan


class ServiceMetrics:
    """The service's metrics for one served model version; create inside the worker."""

    def __init__(
        self, model: str, version: str, backend: str, calibration: Calibration, window: int = 1000
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # lazily: see the module docstring

        self.model, self.version, self.backend = model, version, backend
        self.decisions = Counter(
            "abstain_decisions",
            "Predict-or-abstain decisions.",
            ["model", "version", "operating_point", "decision"],
        )
        points = tuple(calibration.operating_points)
        #: operating point name -> the scale of its threshold (``point_scale``)
        self._scale: dict[str, str] = {p.name: point_scale(p) for p in points}
        #: the score histogram of each scale, its edges with that scale's thresholds merged in
        self.score_histograms: dict[str, Any] = {}
        for scale, (name, fixed) in SCORE_HISTOGRAMS.items():
            thresholds = [p.threshold for p in points if self._scale[p.name] == scale]
            self.score_histograms[scale] = Histogram(
                name,
                f"The score the operating point thresholds, on the {scale} scale (label score: "
                "selection, softmax_response, combined), per decided image; the calibrated "
                "thresholds are bucket edges.",
                ["model", "version", "score"],
                buckets=score_buckets(fixed, thresholds),
            )
        self.selection_score = self.score_histograms[SCORE_SCALE_PROBABILITY]
        self.selection_logit_score = self.score_histograms[SCORE_SCALE_LOGIT]
        self.target_coverage = Gauge(
            "abstain_target_coverage",
            "Coverage the operating point was calibrated for (target, else measured on calibration data).",
            ["model", "version", "operating_point"],
            multiprocess_mode="mostrecent",
        )
        self.abstention_rate = Gauge(
            "abstain_abstention_rate",
            "Abstention rate over this worker's last N decisions.",
            ["model", "version", "operating_point"],
            multiprocess_mode="mostrecent",
        )
        self.estimated_risk = Gauge(
            "abstain_estimated_risk",
            "Label-free estimate of the selective risk: mean(1 - calibrated confidence) over this "
            "worker's last N answered decisions (assumes the probabilities stay calibrated).",
            ["model", "version", "operating_point"],
            multiprocess_mode="mostrecent",
        )
        self.class_decisions = Counter(
            "abstain_class_decisions",
            "Decisions of class-conditional operating points, by predicted class.",
            ["model", "version", "operating_point", "class_index", "decision"],
        )
        self.inference_seconds = Histogram(
            "abstain_inference_seconds",
            "Wall time of one backend forward pass (one batch).",
            ["model", "version", "backend"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "abstain_batch_size",
            "Images per backend forward pass (after adaptive batching).",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
        )
        self.rejected = Counter(
            "abstain_rejected_inputs",
            "Requests rejected before inference, by reason.",
            ["model", "version", "reason"],
        )
        self.backend_errors = Counter(
            "abstain_backend_errors",
            "Requests answered 503 because the inference backend failed (down, timed out, errored).",
            ["model", "version", "backend"],
        )
        self.backend_errors.labels(model, version, backend)  # a zero before the first failure
        self.internal_errors = Counter(
            "abstain_internal_errors",
            "Requests answered 500 because of a bug in the service's own code (logged with a traceback).",
            ["model", "version"],
        )
        self.internal_errors.labels(model, version)
        self._window = window
        self._rolling: dict[str, RollingRate] = {}
        self._answered_error: dict[str, RollingMean] = {}
        self._estimates = calibration.temperature is not None
        #: class-conditional points whose decisions are counted per class (MAX_CLASS_LABELS)
        self.per_class_points = {
            p.name
            for p in points
            if "class_thresholds" in p.extra and len(p.extra["class_thresholds"]) <= MAX_CLASS_LABELS
        }
        for point in points:
            for k in range(
                len(point.extra["class_thresholds"]) if point.name in self.per_class_points else 0
            ):
                for decision in ("predict", "abstain"):
                    self.class_decisions.labels(model, version, point.name, str(k), decision)
            if self._estimates:
                self.estimated_risk.labels(model, version, point.name).set(math.nan)
            target = point.target_coverage if point.target_coverage is not None else point.coverage
            if target is not None:
                self.target_coverage.labels(model, version, point.name).set(float(target))
            # touch the series so dashboards see zeros before the first request
            for decision in ("predict", "abstain"):
                self.decisions.labels(model, version, point.name, decision)
            self.score_histograms[self._scale[point.name]].labels(model, version, point.score)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, version, reason)

    def observe_decisions(
        self,
        operating_point: str,
        answered: Sequence[bool],
        score: str,
        scores: Iterable[float],
        calibrated_confidence: Sequence[float] | None = None,
        classes: Sequence[int] | None = None,
    ) -> None:
        """Count the decisions (``answered[i]``: predicted, else abstained), record the ``scores``
        the operating point thresholds (named ``score``) in the histogram of the point's scale
        (a point the calibration does not name: ``probability``), update the rolling rate, and,
        given each decision's ``calibrated_confidence``, the estimated risk of the answered; with
        each decision's predicted ``classes``, the per-class counts of a class-conditional point."""
        labels = (self.model, self.version, operating_point)
        n_predict = int(sum(answered))
        if len(answered) - n_predict:
            self.decisions.labels(*labels, "abstain").inc(len(answered) - n_predict)
        if n_predict:
            self.decisions.labels(*labels, "predict").inc(n_predict)
        histogram = self.score_histograms[self._scale.get(operating_point, SCORE_SCALE_PROBABILITY)]
        observe_many(histogram.labels(self.model, self.version, score), scores)
        rolling = self._rolling.setdefault(operating_point, RollingRate(self._window))
        self.abstention_rate.labels(*labels).set(rolling.extend(not a for a in answered))
        if classes is not None and operating_point in self.per_class_points:
            counts: dict[tuple[int, bool], int] = {}
            for k, ok in zip(classes, answered, strict=True):
                counts[k, ok] = counts.get((k, ok), 0) + 1
            for (k, ok), count in counts.items():
                decision = "predict" if ok else "abstain"
                self.class_decisions.labels(*labels, str(k), decision).inc(count)
        if calibrated_confidence is not None and self._estimates and n_predict:
            errors = self._answered_error.setdefault(operating_point, RollingMean(self._window))
            expected = (1.0 - p for p, ok in zip(calibrated_confidence, answered, strict=True) if ok)
            self.estimated_risk.labels(*labels).set(errors.extend(expected))

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.labels(self.model, self.version).observe(size)
        self.inference_seconds.labels(self.model, self.version, self.backend).observe(seconds)

    def reject(self, reason: RejectReason) -> None:
        self.rejected.labels(self.model, self.version, reason).inc()

    def backend_error(self) -> None:
        self.backend_errors.labels(self.model, self.version, self.backend).inc()

    def internal_error(self) -> None:
        self.internal_errors.labels(self.model, self.version).inc()
