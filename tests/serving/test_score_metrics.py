"""The metrics watch what decides: the thresholded score, by name, on its own scale (one histogram
per scale, the calibrated thresholds among its bucket edges); rejections carry model and version."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abstain.contract import SCORE_SCALE_LOGIT
from abstain.decisions import decide_arrays
from abstain.operating_points import Calibration, OperatingPoint
from abstain.risk_coverage import sigmoid
from abstain.serving.metrics import LOGIT_BUCKETS, SELECTION_BUCKETS, ServiceMetrics, score_buckets
from tests.answer_helpers import decide

LOGITS = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
G = np.array([0.9, 0.2], dtype=np.float32)
# softmax([2, 0]) max = e²/(e²+1) = 0.880797; softmax([0, 1]) max = e/(1+e) = 0.731059
SR = [math.exp(2) / (math.exp(2) + 1), math.e / (1 + math.e)]


def point(score: str, threshold: float) -> OperatingPoint:
    return OperatingPoint(name=f"{score}-op", method="coverage", score=score, threshold=threshold)


@pytest.mark.parametrize(
    ("score", "want"),
    [
        ("selection", [0.9, 0.2]),
        ("softmax_response", SR),
        ("combined", [math.sqrt(0.9 * SR[0]), math.sqrt(0.2 * SR[1])]),  # 0.890350, 0.382376
    ],
)
def test_decide_arrays_give_the_thresholded_score(score: str, want: list[float]) -> None:
    arrays = decide_arrays(LOGITS, G, point(score, 0.8))
    np.testing.assert_allclose(arrays.score_value, want, atol=1e-7)
    np.testing.assert_allclose(arrays.confidence, SR, atol=1e-7)
    assert arrays.answered.tolist() == [w >= 0.8 for w in want]
    answers = decide(LOGITS, G, point(score, 0.8), ["a", "b"])
    assert [a["score_value"] for a in answers] == pytest.approx(want, abs=1e-7)


def _unregister(m: ServiceMetrics) -> None:
    """Every metric of ``m`` out of the default registry, so that the next test can make its own."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    # each metric once (the score histograms are attributes and the values of score_histograms)
    for collector in {id(v): v for v in vars(m).values() if isinstance(v, MetricWrapperBase)}.values():
        REGISTRY.unregister(collector)


@pytest.fixture
def metrics() -> Iterator[ServiceMetrics]:
    m = ServiceMetrics("digits", "1", "onnxruntime", _calibration())  # type: ignore[arg-type]
    yield m
    _unregister(m)


def _calibration():
    class _Stub:  # ServiceMetrics reads only the operating points and the temperature
        operating_points = ()
        temperature = None

    return _Stub()


def test_score_histogram_is_labelled_by_score_and_rejections_by_model(metrics: ServiceMetrics) -> None:
    from prometheus_client import REGISTRY

    arrays = decide_arrays(LOGITS, G, point("softmax_response", 0.8))
    metrics.observe_decisions(
        "sr-op", arrays.answered.tolist(), "softmax_response", arrays.score_value.tolist()
    )
    labels = {"model": "digits", "version": "1", "score": "softmax_response"}
    assert REGISTRY.get_sample_value("abstain_selection_score_count", labels) == 2
    assert REGISTRY.get_sample_value("abstain_selection_score_sum", labels) == pytest.approx(sum(SR))
    # 0.731 and 0.881 are both above 0.7 and at most 0.9; g (0.9, 0.2) would put one under 0.25
    assert REGISTRY.get_sample_value("abstain_selection_score_bucket", {**labels, "le": "0.7"}) == 0
    assert REGISTRY.get_sample_value("abstain_selection_score_bucket", {**labels, "le": "0.9"}) == 2
    assert (
        REGISTRY.get_sample_value("abstain_selection_score_count", {**labels, "score": "selection"}) is None
    )
    decided = {"model": "digits", "version": "1", "operating_point": "sr-op"}
    assert REGISTRY.get_sample_value("abstain_decisions_total", {**decided, "decision": "predict"}) == 1
    assert REGISTRY.get_sample_value("abstain_decisions_total", {**decided, "decision": "abstain"}) == 1
    metrics.reject("bad_npy")
    rejected = {"model": "digits", "version": "1", "reason": "bad_npy"}
    assert REGISTRY.get_sample_value("abstain_rejected_inputs_total", rejected) == 1


def test_estimated_risk_is_the_mean_expected_error_of_the_last_answered() -> None:
    """At T = 2 the two images' calibrated confidences are those of logits (1, 0) and (0, 0.5):
    e/(1+e) = 0.731059 and e^0.5/(1+e^0.5) = 0.622459; only answered ones count."""
    from prometheus_client import REGISTRY

    sr_point = point("softmax_response", 0.8)
    cal = Calibration("0" * 64, (sr_point,), sr_point.name, confidence_calibration={"temperature": 2.0})
    m = ServiceMetrics("digits", "1", "onnxruntime", cal, window=2)
    try:
        labels = {"model": "digits", "version": "1", "operating_point": sr_point.name}
        assert math.isnan(REGISTRY.get_sample_value("abstain_estimated_risk", labels))  # before any answer
        d = decide_arrays(LOGITS, G, sr_point, temperature=2.0)
        assert d.calibrated_confidence is not None
        np.testing.assert_allclose(d.calibrated_confidence, [0.731059, 0.622459], atol=1e-6)
        confidence = d.calibrated_confidence.tolist()
        # image 0 answered (SR 0.881 >= 0.8), image 1 abstained (0.731): only 1 - 0.731059 counts
        m.observe_decisions(sr_point.name, d.answered.tolist(), "softmax_response", [0.0, 0.0], confidence)
        assert REGISTRY.get_sample_value("abstain_estimated_risk", labels) == pytest.approx(
            0.268941, abs=1e-6
        )
        # a window of 2 answered: after two answered 0.622459 the first falls out
        m.observe_decisions(sr_point.name, [True, True], "softmax_response", [0.0, 0.0], [confidence[1]] * 2)
        assert REGISTRY.get_sample_value("abstain_estimated_risk", labels) == pytest.approx(
            0.377541, abs=1e-6
        )
    finally:
        _unregister(m)
    old = ServiceMetrics("digits", "1", "onnxruntime", Calibration("0" * 64, (sr_point,), sr_point.name))
    try:  # a calibration without a temperature: no estimate, no series
        old.observe_decisions(sr_point.name, [True], "softmax_response", [0.9], [0.9])
        assert REGISTRY.get_sample_value("abstain_estimated_risk", labels) is None
    finally:
        _unregister(old)


@pytest.mark.parametrize("n", [3, 200])  # observe() itself, and the bucket counts of observe_many
@pytest.mark.parametrize(
    ("buckets", "spread"),
    [
        (score_buckets(SELECTION_BUCKETS, [0.98765432101]), 1.0),  # probabilities, a threshold edge
        (score_buckets(LOGIT_BUCKETS, [2.718281828, -0.3]), 100.0),  # logits in [-50, 50], two more
    ],
    ids=["probability", "logit"],
)
def test_observe_many_exposes_what_one_observe_per_value_does(
    n: int, buckets: tuple[float, ...], spread: float
) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from abstain.serving.metrics import observe_many

    rng = np.random.default_rng(n)
    # on the bounds exactly (le is inclusive), between them, below the first, above the last (+Inf)
    random = ((rng.random(n) - (0.5 if spread > 1 else 0.0)) * spread).tolist()
    values = [*buckets, buckets[0] - 1.0, -2.0, buckets[-1] + 2.5, math.inf, *random][:n]
    exposed, sums = [], []
    for bulk in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("h", "h", ["score"], buckets=buckets, registry=registry).labels("s")
        if bulk:
            observe_many(hist, values)
        else:
            for v in values:
                hist.observe(v)
        exposed.append({s.labels.get("le", s.name): s.value for s in next(iter(registry.collect())).samples})
        sums.append(hist._sum.get())
    one_by_one, many = exposed
    # no _sum exposed with negative edges (prometheus_client follows OpenMetrics), but kept: sums
    assert ("h_sum" in one_by_one) == ("h_sum" in many) == (buckets[0] >= 0)
    assert sums[0] == pytest.approx(sums[1])
    one_by_one.pop("h_sum", None), many.pop("h_sum", None)
    one_by_one.pop("h_created"), many.pop("h_created")  # when each histogram was made
    assert many == one_by_one  # every bucket and the count, exactly
    assert one_by_one["h_count"] == n


# issue 18: every score on its own scale, the thresholds among the bucket edges
LOGIT_T, SR_T, COMBINED_T = 2.718281828, 0.8312, 0.98765432101


def _points_calibration() -> Calibration:
    """A logit selection point (as on a graph with selection_logit), two probability points, and
    one more at 0.95, already an edge of the probability histogram."""
    points = (
        OperatingPoint(
            "logit-op", "coverage", "selection", LOGIT_T, extra={"score_scale": SCORE_SCALE_LOGIT}
        ),
        OperatingPoint("sr-op", "coverage", "softmax_response", SR_T),
        OperatingPoint("combined-op", "risk", "combined", COMBINED_T),
        OperatingPoint("sr-95", "coverage", "softmax_response", 0.95, extra={"score_scale": "probability"}),
    )
    return Calibration(graph_sha256="0" * 64, operating_points=points, default_operating_point="logit-op")


@pytest.fixture
def scaled() -> Iterator[ServiceMetrics]:
    m = ServiceMetrics("digits", "1", "onnxruntime", _points_calibration())
    yield m
    _unregister(m)


def _le(text: str, metric: str, score: str) -> list[str]:
    """The ``le`` values of ``metric``'s buckets for ``score`` in a text exposition, in order."""
    pattern = rf'^{metric}_bucket\{{(?=[^}}]*score="{score}")[^}}]*le="([^"]+)"'
    return re.findall(pattern, text, flags=re.MULTILINE)


def test_the_exposition_has_each_threshold_as_a_bucket_edge_of_its_scale(scaled: ServiceMetrics) -> None:
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    # the series of every point's score exist before the first request (zeros), on its scale
    logit = _le(text, "abstain_selection_logit_score", "selection")
    probability = _le(text, "abstain_selection_score", "softmax_response")
    assert probability == _le(text, "abstain_selection_score", "combined")  # one bucket list a metric
    assert repr(LOGIT_T) in logit and repr(LOGIT_T) not in probability
    assert repr(SR_T) in probability and repr(COMBINED_T) in probability and repr(SR_T) not in logit
    assert [float(b) for b in logit] == [*sorted([*LOGIT_BUCKETS, LOGIT_T]), math.inf]
    # 0.95 is an edge already: listed once
    assert [float(b) for b in probability] == [*sorted([*SELECTION_BUCKETS, SR_T, COMBINED_T]), math.inf]
    assert _le(text, "abstain_selection_score", "selection") == []  # selection is a logit here


@pytest.mark.parametrize("chunks", [[6], [3, 3]], ids=["observe_many", "observe"])
def test_a_logit_score_lands_in_the_logit_histogram_in_its_bucket(
    scaled: ServiceMetrics, chunks: list[int]
) -> None:
    from prometheus_client import REGISTRY

    z = np.array([-1.2, 2.6, LOGIT_T, 2.8, 17.5, 45.0])  # g's logits; float32 g is 1.0 for the last two
    point = _points_calibration().operating_point("logit-op")
    d = decide_arrays(np.zeros((6, 2)), sigmoid(z).astype(np.float32), point, selection_logit=z)
    assert d.answered.tolist() == [False, False, True, True, True, True]  # z >= e
    start = 0
    for size in chunks:
        answered, values = d.answered[start : start + size], d.score_value[start : start + size]
        scaled.observe_decisions("logit-op", answered.tolist(), "selection", values.tolist())
        start += size
    labels = {"model": "digits", "version": "1", "score": "selection"}

    def bucket(le: str) -> float | None:
        return REGISTRY.get_sample_value("abstain_selection_logit_score_bucket", {**labels, "le": le})

    # by hand: -1.2 <= -1.0; 2.6 and e itself <= e; 2.8 <= 3.0; 17.5 <= 20.0; 45.0 only in +Inf
    assert [bucket(le) for le in ("-1.5", "-1.0", "2.5")] == [0, 1, 1]
    assert [bucket(le) for le in (repr(LOGIT_T), "3.0", "15.0", "20.0", "40.0", "+Inf")] == [3, 4, 4, 5, 5, 6]
    assert REGISTRY.get_sample_value("abstain_selection_logit_score_count", labels) == 6
    # negative edges: prometheus_client exposes no _sum (OpenMetrics), yet keeps it (multiprocess
    # mode exposes it from the files)
    assert REGISTRY.get_sample_value("abstain_selection_logit_score_sum", labels) is None
    child = scaled.selection_logit_score.labels("digits", "1", "selection")
    assert child._sum.get() == pytest.approx(-1.2 + 2.6 + LOGIT_T + 2.8 + 17.5 + 45.0)
    # the bucket at the threshold holds the 2 abstentions, plus the score exactly at it (answered)
    decided = {"model": "digits", "version": "1", "operating_point": "logit-op"}
    assert REGISTRY.get_sample_value("abstain_decisions_total", {**decided, "decision": "abstain"}) == 2
    # nothing reached the probability histogram, whose [0, 1] buckets would read a logit as g
    assert REGISTRY.get_sample_value("abstain_selection_score_count", labels) is None


def test_a_probability_score_crossing_its_threshold_shows_in_the_threshold_bucket(
    scaled: ServiceMetrics,
) -> None:
    from prometheus_client import REGISTRY

    labels = {"model": "digits", "version": "1", "score": "softmax_response"}
    # 0.8311 and 0.8313 share the fixed bucket (0.8, 0.85]: only the threshold's edge splits them
    scaled.observe_decisions("sr-op", [False, True, True], "softmax_response", [0.8311, 0.8313, 0.9])
    sample = "abstain_selection_score_bucket"
    assert REGISTRY.get_sample_value(sample, {**labels, "le": "0.8"}) == 0
    assert REGISTRY.get_sample_value(sample, {**labels, "le": repr(SR_T)}) == 1
    assert REGISTRY.get_sample_value(sample, {**labels, "le": "0.85"}) == 2
    assert REGISTRY.get_sample_value("abstain_selection_logit_score_count", labels) is None


_MULTIPROCESS = """
import sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from abstain.serving.metrics import ServiceMetrics
from tests.serving.test_score_metrics import LOGIT_T, _points_calibration

m = ServiceMetrics("digits", "1", "onnxruntime", _points_calibration())
m.observe_decisions("logit-op", [False, True, True, True, True], "selection", [2.6, LOGIT_T, 2.8, 17.5, 45.0])
registry = CollectorRegistry()
MultiProcessCollector(registry)
sys.stdout.write(generate_latest(registry).decode())
"""


def test_threshold_edges_survive_the_multiprocess_files(tmp_path: Path) -> None:
    """Under BentoML the histograms live in mmap files, one series per ``le`` string: the
    threshold edges come back from them as they went in, with their counts."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS], env=env, cwd=root, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert repr(LOGIT_T) in _le(out.stdout, "abstain_selection_logit_score", "selection")
    assert repr(COMBINED_T) in _le(out.stdout, "abstain_selection_score", "combined")
    line = rf'^abstain_selection_logit_score_bucket\{{[^}}]*le="{re.escape(repr(LOGIT_T))}"[^}}]*\}} (\S+)$'
    assert [float(v) for v in re.findall(line, out.stdout, flags=re.MULTILINE)] == [2.0]  # 2.6 and e
