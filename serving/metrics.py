"""Prometheus metrics of the predict-or-abstain service (names are a contract with ``deploy/``).

=====================================  =========  ===============================================
name                                   type       labels
=====================================  =========  ===============================================
``abstain_decisions_total``            counter    model, version, operating_point, decision
``abstain_selection_score``            histogram  model, version, score (buckets 0.05 … 0.999, 1.0)
``abstain_target_coverage``            gauge      model, version, operating_point
``abstain_abstention_rate``            gauge      model, version, operating_point
``abstain_inference_seconds``          histogram  model, version, backend
``abstain_batch_size``                 histogram  model, version
``abstain_rejected_inputs_total``      counter    model, version, reason
``abstain_backend_errors_total``       counter    model, version, backend
=====================================  =========  ===============================================

``abstain_selection_score`` records, for each decided image, the score its operating point
thresholds (``score`` = ``selection`` for g, ``softmax_response`` or ``combined``): drift is
watched on the number that decides, not on g when g decides nothing.

A backend failure (Triton down or past its timeout, an ONNX Runtime error) is not a fault of
the client's input, so it is not a rejected input: it has its own counter, and the request
is answered 503 ``backend_unavailable``.

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

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from abstain.operating_points import Calibration

#: Reasons an input is rejected (label values of ``abstain_rejected_inputs_total``).
REJECT_REASONS = (
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
)
#: 0.05, 0.10, …, 0.95, then finer towards 1: a confident model's thresholds sit there (the
#: embedded digits model's are above 0.98), and drift shows first as mass leaving the top buckets
SELECTION_BUCKETS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.975, 0.99, 0.995, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def observe_many(histogram: Any, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, with one increment per bucket hit.

    prometheus_client observes one value per call, each taking two locks and (multiprocess mode,
    as under BentoML) two mmap writes: 64 images cost ~170 µs on the event loop. This counts the
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
        self.selection_score = Histogram(
            "abstain_selection_score",
            "The score the operating point thresholds (label score: selection, softmax_response, "
            "combined), per decided image.",
            ["model", "version", "score"],
            buckets=SELECTION_BUCKETS,
        )
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
        self._window = window
        self._rolling: dict[str, RollingRate] = {}
        for point in calibration.operating_points:
            target = point.target_coverage if point.target_coverage is not None else point.coverage
            if target is not None:
                self.target_coverage.labels(model, version, point.name).set(float(target))
            # touch the series so dashboards see zeros before the first request
            for decision in ("predict", "abstain"):
                self.decisions.labels(model, version, point.name, decision)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, version, reason)

    def observe_decisions(
        self, operating_point: str, answered: Sequence[bool], score: str, scores: Iterable[float]
    ) -> None:
        """Count the decisions (``answered[i]``: predicted, else abstained), record the ``scores``
        the operating point thresholds (named ``score``), and update the rolling rate."""
        labels = (self.model, self.version, operating_point)
        n_predict = int(sum(answered))
        if len(answered) - n_predict:
            self.decisions.labels(*labels, "abstain").inc(len(answered) - n_predict)
        if n_predict:
            self.decisions.labels(*labels, "predict").inc(n_predict)
        observe_many(self.selection_score.labels(self.model, self.version, score), scores)
        rolling = self._rolling.setdefault(operating_point, RollingRate(self._window))
        self.abstention_rate.labels(*labels).set(rolling.extend(not a for a in answered))

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.labels(self.model, self.version).observe(size)
        self.inference_seconds.labels(self.model, self.version, self.backend).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model, self.version, reason).inc()

    def backend_error(self) -> None:
        self.backend_errors.labels(self.model, self.version, self.backend).inc()
