"""Unit tests of the pure parts: decisions, rolling rate, request parsing, adaptive batching."""

from __future__ import annotations

import asyncio
import io
import math

import numpy as np
import pytest
from PIL import Image

from abstain.contract import InputSpec
from abstain.operating_points import OperatingPoint
from abstain.runtime import GraphOutputs
from abstain.serving.http.validation import InputRejectedError, decode_image, parse_pixels
from abstain.serving.inference.batcher import AdaptiveBatcher
from abstain.serving.metrics import RollingRate
from tests.answer_helpers import decide

POINT = OperatingPoint(name="coverage-0.9", method="coverage", score="selection", threshold=0.5)
SPEC = InputSpec(1, 2, 2)


def test_decide_predicts_above_and_abstains_below_threshold() -> None:
    # row 0: softmax([2, 0]) = [e²/(e²+1), 1/(e²+1)] = [0.8808, 0.1192]; g = 0.9 >= 0.5 → predict "a"
    # row 1: softmax([0, 1]) → class 1 with 0.7311; g = 0.2 < 0.5 → abstain, candidate "b"
    logits = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    out = decide(logits, np.array([0.9, 0.2], dtype=np.float32), POINT, ["a", "b"])
    p, a = out
    assert p["decision"] == "predict" and p["label"] == "a" and p["class_index"] == 0
    assert p["confidence"] == pytest.approx(math.e**2 / (math.e**2 + 1))
    assert p["score"] == "selection" and p["score_value"] == pytest.approx(0.9)
    assert p["threshold"] == 0.5 and p["operating_point"] == "coverage-0.9" and "reason" not in p
    assert a["decision"] == "abstain" and "label" not in a
    assert a["candidate"] == {
        "label": "b",
        "class_index": 1,
        "confidence": pytest.approx(math.e / (math.e + 1)),
    }
    assert a["reason"] == "selection score 0.2000 below threshold 0.5000 of operating point coverage-0.9"


def test_an_abstention_carries_its_points_prediction_set() -> None:
    # softmax([0, 1, 1.5]) = [0.1220, 0.3315, 0.5465]; LAC at quantile 0.7 keeps 1 - p <= 0.7,
    # i.e. p >= 0.3: classes 1 and 2; softmax([3, 0, 0]) = [0.9094, 0.0453, 0.0453] keeps class 0
    point = OperatingPoint(
        name="c", method="coverage", score="selection", threshold=0.5,
        extra={"prediction_set": {"method": "lac", "alpha": 0.2, "quantile": 0.7}},
    )  # fmt: skip
    logits = np.array([[0.0, 1.0, 1.5], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    abstained, confident, answered = decide(logits, np.array([0.1, 0.2, 0.9]), point, ["a", "b", "c"])
    assert abstained["candidate"]["prediction_set"] == {
        "labels": ["b", "c"], "class_indices": [1, 2], "level": pytest.approx(0.8), "method": "lac",
    }  # fmt: skip
    assert confident["candidate"]["prediction_set"]["class_indices"] == [0]
    assert "candidate" not in answered and "prediction_set" not in str(answered)
    # a point without a set (calibrations older than sets): the candidate as before
    assert "prediction_set" not in decide(logits, np.array([0.1] * 3), POINT, ["a", "b", "c"])[0]["candidate"]


def test_decide_uses_the_operating_points_score() -> None:
    # combined = sqrt(g · softmax response) = sqrt(0.9 · 0.8808) = 0.8904 >= 0.89 → predict;
    # the same sample abstains at 0.8905
    point = OperatingPoint(name="c", method="coverage", score="combined", threshold=0.89)
    logits, g = np.array([[2.0, 0.0]]), np.array([0.9])
    assert decide(logits, g, point, ["a", "b"])[0]["decision"] == "predict"
    stricter = OperatingPoint(name="c", method="coverage", score="combined", threshold=0.8905)
    assert decide(logits, g, stricter, ["a", "b"])[0]["decision"] == "abstain"
    # score equal to the threshold is answered (>=)
    exact = OperatingPoint(name="e", method="coverage", score="selection", threshold=0.9)
    assert decide(logits, g, exact, ["a", "b"])[0]["decision"] == "predict"


def test_decide_rejects_mismatched_outputs() -> None:
    with pytest.raises(ValueError, match="logits should be"):
        decide(np.zeros((2, 2)), np.zeros(3), POINT, ["a", "b"])
    with pytest.raises(ValueError, match="3 class names"):
        decide(np.zeros((1, 2)), np.zeros(1), POINT, ["a", "b", "c"])


def test_rolling_rate_forgets_old_decisions() -> None:
    rate = RollingRate(3)
    assert rate.value == 0.0
    assert rate.extend([True, False]) == pytest.approx(1 / 2)
    # T, F, T, T: the window of 3 holds F, T, T → 2/3 (the first T fell out)
    assert rate.extend([True, True]) == pytest.approx(2 / 3)
    assert rate.extend([True]) == pytest.approx(3 / 3)  # T, T, T
    assert rate.extend([False, False, False]) == 0.0
    with pytest.raises(ValueError, match="positive"):
        RollingRate(0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([], "empty_batch"),
        (np.zeros((0, 1, 2, 2)).tolist(), "empty_batch"),
        ([[[0.1, 0.2], [0.3]]], "bad_shape"),  # ragged
        ([0.1, 0.2], "bad_shape"),
        (np.zeros((1, 1, 3, 3)).tolist(), "bad_shape"),
        ([[["a", "b"], ["c", "d"]]], "bad_dtype"),
        ([[[None, 0.1], [0.2, 0.3]]], "bad_dtype"),
        ([[[True, False], [True, False]]], "bad_dtype"),
        ([[[float("nan"), 0.1], [0.2, 0.3]]], "non_finite"),
        ([[[1e300, 0.1], [0.2, 0.3]]], "non_finite"),  # overflows float32
        ([[[1.5, 0.1], [0.2, 0.3]]], "out_of_range"),
        ([[[-0.1, 0.1], [0.2, 0.3]]], "out_of_range"),
        (np.zeros((5, 1, 2, 2)).tolist(), "batch_too_large"),
    ],
)
def test_parse_pixels_rejects(raw: object, reason: str) -> None:
    with pytest.raises(InputRejectedError, match="valid: float pixels in \\[0, 1\\]") as info:
        parse_pixels(raw, SPEC, max_batch=4)
    assert info.value.reason == reason


def test_parse_pixels_accepts_one_image_or_a_batch() -> None:
    one = parse_pixels([[[0, 1], [0.5, 0.25]]], SPEC, max_batch=4)
    assert one.shape == (1, 1, 2, 2) and one.dtype == np.float32 and one[0, 0, 1, 0] == 0.5
    assert parse_pixels(np.zeros((4, 1, 2, 2)).tolist(), SPEC, max_batch=4).shape == (4, 1, 2, 2)


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_converts_to_the_input_spec() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:, :, :] = 255  # white → 1.0 after grey conversion
    x = decode_image(_png(rgb), SPEC)
    assert x.shape == (1, 1, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0)
    grey = np.array([[0, 51], [102, 255]], dtype=np.uint8)  # same size: values / 255 exactly
    np.testing.assert_allclose(decode_image(_png(grey), SPEC)[0, 0], grey / 255.0, atol=1e-7)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", _png(np.zeros((4, 4), np.uint8))[:40], _png(np.zeros((4, 4), np.uint8), "GIF")],
    ids=["empty", "garbage", "truncated", "gif"],
)
def test_decode_image_rejects(data: bytes) -> None:
    with pytest.raises(InputRejectedError, match="PNG or JPEG") as info:
        decode_image(data, SPEC)
    assert info.value.reason == "bad_image"
    assert "BytesIO" not in info.value.message  # no internal object names in a client's error


def test_batcher_coalesces_concurrent_requests_and_splits_results() -> None:
    calls: list[int] = []

    def infer(x: np.ndarray) -> GraphOutputs:
        calls.append(len(x))
        flat = x.reshape(len(x), -1)
        return GraphOutputs(logits=flat, selection=flat[:, 0])

    async def main(batcher: AdaptiveBatcher) -> list[GraphOutputs]:
        xs = [np.full((n, 1, 2, 2), i, np.float32) for i, n in enumerate((2, 3, 1))]
        return await asyncio.gather(*(batcher.submit(x) for x in xs))

    outs = asyncio.run(main(AdaptiveBatcher(infer, max_batch_size=64, max_latency_ms=50)))
    assert calls == [6]  # one forward pass for the three requests
    assert [o.selection.tolist() for o in outs] == [[0, 0], [1, 1, 1], [2]]
    calls.clear()
    outs = asyncio.run(main(AdaptiveBatcher(infer, max_batch_size=4, max_latency_ms=50)))
    # the first pass collects 2 + 3 = 5 >= 4 images and runs them as 4 + 1; the last request
    # forms the next pass; results still come back to the right request, in order
    assert calls == [4, 1, 1]
    assert [o.selection.tolist() for o in outs] == [[0, 0], [1, 1, 1], [2]]


def test_batcher_fails_the_batch_not_the_loop() -> None:
    def infer(x: np.ndarray) -> GraphOutputs:
        if (x > 0.5).any():
            raise RuntimeError("backend down")
        return GraphOutputs(logits=x.reshape(len(x), -1), selection=np.zeros(len(x)))

    async def main() -> None:
        batcher = AdaptiveBatcher(infer, max_latency_ms=0)
        with pytest.raises(RuntimeError, match="backend down"):
            await batcher.submit(np.ones((1, 1, 2, 2), np.float32))
        ok = await batcher.submit(np.zeros((1, 1, 2, 2), np.float32))
        assert ok.selection.tolist() == [0.0]

    asyncio.run(main())


def test_decide_takes_a_given_decision_over_the_threshold() -> None:
    # a selective graph's accept column (serving/triton/selective_backend.py) decides, not score >= threshold:
    # g = 0.9 >= 0.5 would predict, g = 0.2 would abstain; the given answers say the opposite
    logits = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    g = np.array([0.9, 0.2], dtype=np.float32)
    out = decide(logits, g, POINT, ["a", "b"], answered=np.array([False, True]))
    assert [d["decision"] for d in out] == ["abstain", "predict"]
    assert out[1]["label"] == "b" and out[0]["candidate"]["label"] == "a"
