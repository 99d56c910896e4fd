"""The metrics watch what decides: the thresholded score, by name; rejections carry model and version."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from abstain.decisions import decide_arrays
from abstain.operating_points import OperatingPoint
from abstain.serving.http.answers import decide
from abstain.serving.metrics import ServiceMetrics

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


@pytest.fixture
def metrics() -> Iterator[ServiceMetrics]:
    from prometheus_client import REGISTRY

    m = ServiceMetrics("digits", "1", "onnxruntime", _calibration())  # type: ignore[arg-type]
    yield m
    for collector in (
        m.decisions,
        m.selection_score,
        m.target_coverage,
        m.abstention_rate,
        m.inference_seconds,
        m.batch_size,
        m.rejected,
        m.backend_errors,
    ):
        REGISTRY.unregister(collector)


def _calibration():
    class _Stub:  # ServiceMetrics reads only the operating points
        operating_points = ()

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


@pytest.mark.parametrize("n", [3, 200])  # observe() itself, and the bucket counts of observe_many
def test_observe_many_exposes_what_one_observe_per_value_does(n: int) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from abstain.serving.metrics import SELECTION_BUCKETS, observe_many

    rng = np.random.default_rng(n)
    # on the bounds exactly (le is inclusive), between them, below the first, above 1.0 (+Inf)
    values = [*SELECTION_BUCKETS, 0.0, -2.0, 3.5, math.inf, *rng.random(n).tolist()][:n]
    exposed = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("h", "h", ["score"], buckets=SELECTION_BUCKETS, registry=registry).labels("s")
        if bulk:
            observe_many(hist, values)
        else:
            for v in values:
                hist.observe(v)
        exposed.append({s.labels.get("le", s.name): s.value for s in next(iter(registry.collect())).samples})
    one_by_one, many = exposed
    assert one_by_one.pop("h_sum") == pytest.approx(many.pop("h_sum"))
    one_by_one.pop("h_created"), many.pop("h_created")  # when each histogram was made
    assert many == one_by_one  # every bucket and the count, exactly
    assert one_by_one["h_count"] == n
