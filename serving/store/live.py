"""Is it still right? Decisions recorded, delayed labels joined, live selective risk exported.

=========================================  =======  ==========================================
name                                       type     labels
=========================================  =======  ==========================================
``abstain_live_selective_risk``            gauge    model, version, operating_point
``abstain_live_risk_lower_bound``          gauge    model, version, operating_point
``abstain_live_risk_upper_bound``          gauge    model, version, operating_point
``abstain_live_coverage``                  gauge    model, version, operating_point
``abstain_live_labelled_decisions``        gauge    model, version, operating_point
``abstain_calibrated_risk``                gauge    model, version, operating_point
``abstain_feedback_total``                 counter  result
``abstain_decisions_not_recorded_total``   counter  model, version
=========================================  =======  ==========================================

The live gauges are over the last ``ABSTAIN_LIVE_WINDOW`` labelled decisions of each
operating point: selective risk = errors among the answered, coverage = answered among the
labelled (Geifman & El-Yaniv, NeurIPS 2017), and the exact two-sided 95 % Clopper–Pearson
interval of the risk (:func:`abstain.bounds.clopper_pearson`; each side 2.5 %). They are
counted in the shared store, never in one worker's memory, and set by whichever worker
computed them last (``multiprocess_mode="mostrecent"``): every worker reads the same rows,
so they agree. They are refreshed after every accepted label and every few seconds (labels
posted to another replica, retention). Before any answered label the risk gauges are NaN.

``abstain_calibrated_risk`` is what the alert compares with (:func:`calibrated_risk`): the
operating point's target risk (risk points, certified by SGR) or, for coverage points, the
upper end of the risk interval measured on the calibration data.
``AbstainLiveRiskAboveCalibrated`` in deploy/prometheus/rules.yml fires when the live lower
bound stays above it: the model is then wrong more often than calibrated with 97.5 %
confidence, not merely by bad luck.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from abstain.bounds import clopper_pearson
from abstain.decisions import ABSTAIN, PREDICT, Decisions
from abstain.operating_points import Calibration, OperatingPoint
from abstain.serving.store.decision_store import Decision, DecisionStore, Retention, ReviewItem, open_store
from abstain.serving.store.recorder import Recorder

if TYPE_CHECKING:
    from abstain.serving.config.settings import ServeSettings

log = logging.getLogger(__name__)
#: Two-sided level of the live risk interval (each bound one-sided at 97.5 %).
LIVE_CONFIDENCE = 0.95
#: Seconds between refreshes of the live gauges from the store.
REFRESH_S = 5.0
#: Values of ``abstain_feedback_total``'s ``result`` label.
FeedbackResult = Literal["accepted", "unknown_request_id", "unknown_label", "duplicate", "bad_feedback"]
FEEDBACK_RESULTS: tuple[FeedbackResult, ...] = get_args(FeedbackResult)


def calibrated_risk(point: OperatingPoint) -> float | None:
    """The selective risk calibration vouches for at ``point``, which the live lower bound is held to.

    A risk point: its target (SGR certified the risk below it). A coverage point: the upper
    end of the risk interval measured at calibration (``risk_interval``, Clopper-Pearson),
    so the alert asks whether the live interval lies wholly above the calibrated one — a
    point estimate would make a single live error "significant" wherever calibration saw
    none. Older calibrations without the interval: the measured risk.
    """
    if point.target_risk is not None:
        return point.target_risk
    interval = point.extra.get("risk_interval")
    if isinstance(interval, list | tuple) and len(interval) == 2 and interval[1] is not None:
        return float(interval[1])
    return point.risk


def _prediction_sets(decisions: Decisions) -> list[dict[str, Any]] | None:
    """Each decided image's conformal set as a review item keeps it; ``None`` without sets."""
    conformal = decisions.point.extra.get("prediction_set")
    if decisions.prediction_set is None or conformal is None:
        return None
    level, method = 1.0 - float(conformal["alpha"]), str(conformal["method"])
    return [
        {"class_indices": np.flatnonzero(row).tolist(), "level": level, "method": method}
        for row in decisions.prediction_set
    ]


class LiveMetrics:
    """The Prometheus series of the module docstring for one served model version; create in the worker."""

    def __init__(self, model: str, version: str, calibration: Calibration) -> None:
        from prometheus_client import Counter, Gauge  # lazily: see abstain.serving.metrics

        self.model, self.version = model, version
        self.points = [p.name for p in calibration.operating_points]
        labels = ["model", "version", "operating_point"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, multiprocess_mode="mostrecent")

        self.risk = gauge("abstain_live_selective_risk", "Errors among answered, last N labelled decisions.")
        self.lower = gauge(
            "abstain_live_risk_lower_bound", "Clopper-Pearson 97.5 % lower bound of the live risk."
        )
        self.upper = gauge(
            "abstain_live_risk_upper_bound", "Clopper-Pearson 97.5 % upper bound of the live risk."
        )
        self.coverage = gauge("abstain_live_coverage", "Answered among the last N labelled decisions.")
        self.labelled = gauge("abstain_live_labelled_decisions", "Labelled decisions in the live window.")
        self.calibrated = gauge(
            "abstain_calibrated_risk",
            "Risk calibration vouches for: the target risk, else the top of the calibration risk interval.",
        )
        self.feedback = Counter("abstain_feedback", "Labels posted to /feedback, by result.", ["result"])
        self.not_recorded = Counter(
            "abstain_decisions_not_recorded",
            "Decisions answered but not recorded (store down or recorder behind).",
            ["model", "version"],
        )
        self.not_recorded.labels(model, version)
        for result in FEEDBACK_RESULTS:
            self.feedback.labels(result)
        for point in calibration.operating_points:
            risk = calibrated_risk(point)
            if risk is not None:
                self.calibrated.labels(model, version, point.name).set(float(risk))

    def refresh(self, store: DecisionStore, window: int) -> None:
        """Recompute every operating point's live gauges from ``store`` (on the recorder thread)."""
        for name in self.points:
            stats = store.live_stats(self.model, self.version, name, window)
            labels = (self.model, self.version, name)
            self.labelled.labels(*labels).set(stats.labelled)
            self.coverage.labels(*labels).set(math.nan if stats.coverage is None else stats.coverage)
            if stats.answered:
                lo, hi = clopper_pearson(stats.errors, stats.answered, LIVE_CONFIDENCE)
                values = (stats.errors / stats.answered, lo, hi)
            else:
                values = (math.nan, math.nan, math.nan)
            for gauge, value in zip((self.risk, self.lower, self.upper), values, strict=True):
                gauge.labels(*labels).set(value)


class DecisionLog:
    """What the service holds when the store is on: the recorder thread and the live metrics."""

    def __init__(
        self,
        open_fn: Any,
        model: str,
        version: str,
        calibration: Calibration,
        window: int,
        review: bool = False,
    ) -> None:
        self.model, self.version, self.window, self.review = model, version, window, review
        self.metrics = LiveMetrics(model, version, calibration)
        self.recorder = Recorder(
            open_fn,
            on_dropped=self.metrics.not_recorded.labels(model, version).inc,
            on_tick=lambda store: self.metrics.refresh(store, window),
            tick_s=REFRESH_S,
        )
        atexit.register(self.recorder.close)  # a worker that stops writes what it buffered

    @classmethod
    def from_settings(
        cls, settings: ServeSettings, model: str, version: str, calibration: Calibration
    ) -> DecisionLog | None:
        """``None`` when ``ABSTAIN_STORE=off``; else a log on the store the settings name."""
        if settings.store == "off":
            return None
        retention = Retention(
            settings.store_max_rows,
            settings.store_max_age_days * 86400.0,
            review_items=settings.review_queue,
            review_bytes=settings.review_max_bytes,
        )
        directory = Path(settings.store_dir) if settings.store_dir else default_store_dir()
        try:  # a store that is down at start-up is not a reason to refuse answers: it is retried
            open_store(settings.store, directory, retention).close()
        except ValueError:
            raise
        except Exception as exc:
            log.warning(
                "decision store %s unavailable at start-up (%s); decisions are not recorded until it is back",
                redact(settings.store),
                exc,
            )
        return cls(
            lambda: open_store(settings.store, directory, retention),
            model,
            version,
            calibration,
            settings.live_window,
            review=settings.review_queue > 0,
        )

    def record(self, request_ids: Sequence[str], decisions: Decisions, x: np.ndarray | None = None) -> None:
        """Queue one :class:`Decision` per decided image (never blocks, never fails the answer),
        and, with the review queue on, each abstained input of ``x`` (float32 ``[N, C, H, W]``)."""
        now = time.time()
        point = decisions.point.name
        # each image's own threshold (a class-conditional point's class threshold; inf: never answered)
        held_to = (
            [float(decisions.point.threshold)] * len(decisions)
            if decisions.thresholds is None
            else decisions.thresholds.tolist()
        )
        answered = decisions.answered.tolist()
        classes = decisions.class_index.tolist()
        scores = decisions.score_value.tolist()
        reviews = []
        if self.review and x is not None:
            confidence = decisions.confidence.tolist()
            sets = _prediction_sets(decisions)
            reviews = [
                ReviewItem(
                    request_id=rid,
                    t=now,
                    model=self.model,
                    version=self.version,
                    operating_point=point,
                    candidate=classes[i],
                    confidence=confidence[i],
                    score=scores[i],
                    threshold=held_to[i],
                    shape=(int(x.shape[1]), int(x.shape[2]), int(x.shape[3])),
                    pixels=np.ascontiguousarray(x[i], dtype=np.float32).tobytes(),
                    prediction_set=None if sets is None else sets[i],
                )
                for i, rid in enumerate(request_ids)
                if not answered[i]
            ]
        self.recorder.record(
            [
                # positional, in COLUMNS order: the hot path of every answer
                Decision(rid, now, self.model, self.version, point, PREDICT if ok else ABSTAIN, k, s, t)
                for rid, ok, k, s, t in zip(request_ids, answered, classes, scores, held_to, strict=True)
            ],
            reviews,
        )

    async def label(self, labels: Sequence[tuple[str, int]]) -> list[Decision]:
        """Apply labels (all or none) on the recorder thread, then refresh the live gauges."""

        def apply(store: DecisionStore) -> list[Decision]:
            done = store.label(labels)
            self.metrics.refresh(store, self.window)
            return done

        return await self.recorder.call(apply)


def default_store_dir() -> Path:
    """``$BENTOML_HOME/abstain-store`` (BentoML's home defaults to ``~/bentoml``)."""

    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "abstain-store"


def redact(url: str) -> str:
    """A store URL fit for logs: a password in it is replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
