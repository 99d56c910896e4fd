"""Class-conditional operating points (``abstain calibrate --per-class``): thresholds recomputed per
class by hand on digits, a class with too few samples never answered, the selective graph deciding
like the service, and a Monte-Carlo check that each class's risk guarantee fails at most δ of the
time — and fails more with a deliberately wrong p-value."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from abstain.bounds import binomial_tail_p_value
from abstain.calibration.calibrate import run_calibration
from abstain.calibration.per_class import MIN_CLASS_SAMPLES, per_class_point
from abstain.datasets import load_digits
from abstain.decisions import decide_arrays
from abstain.export.selective_entry import export_selective_entry
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel
from abstain.serving.http.answers import answers
from tests.graph_factory import write_model_dir


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("repo"))


def _sr_and_classes(version_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = OnnxModel(version_dir / "model.onnx").run(x).logits.astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1), logits.argmax(axis=1)


def test_each_class_gets_the_largest_threshold_answering_its_share(version_dir: Path) -> None:
    run_calibration(
        version_dir.parent, dataset="digits", coverages=[0.8], score="softmax_response", per_class=True
    )
    (point,) = load_calibration(version_dir / "calibration.json").operating_points
    assert point.name == "coverage-0.8-per-class"
    sr, predicted = _sr_and_classes(version_dir, load_digits("val").x)
    thresholds = point.extra["class_thresholds"]
    for k in range(10):
        mine = np.sort(sr[predicted == k])[::-1]
        assert len(mine) >= MIN_CLASS_SAMPLES  # digits/val predicts 25 to 46 of each class
        # the ⌈0.8 n_k⌉-th highest score of the class (no ties among these scores)
        assert thresholds[k] == mine[math.ceil(0.8 * len(mine)) - 1]
    answered = sr >= np.array(thresholds)[predicted]
    assert point.coverage == pytest.approx(answered.mean()) and point.threshold == min(thresholds)
    for k in range(10):  # every class answers at least 80 % of its own
        assert answered[predicted == k].mean() >= 0.8


def test_a_class_with_too_few_samples_is_never_answered_and_the_command_says_so(
    version_dir: Path, tmp_path: Path
) -> None:
    val = load_digits("val")
    _, predicted = _sr_and_classes(version_dir, val.x)
    keep = (predicted != 3) | (np.cumsum(predicted == 3) <= 5)  # 5 images the model calls 3
    data = tmp_path / "few-threes.npz"
    np.savez(data, x=val.x[keep], y=val.y[keep])
    done = subprocess.run(
        [sys.executable, "-m", "abstain", "calibrate", str(version_dir.parent), "--data", str(data),
         "--coverage", "0.9", "--per-class", "--score", "softmax_response"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "class 3: 5 calibration samples predicted as it, fewer than 20: never answered" in " ".join(
        done.stdout.split()
    )
    (point,) = load_calibration(version_dir / "calibration.json").operating_points
    assert point.extra["class_thresholds"][3] is None
    # the service's decision path: an image the model calls 3 is abstained on, whatever its score
    test = load_digits("test")
    out = OnnxModel(version_dir / "model.onnx").run(test.x)
    d = decide_arrays(out.logits, out.selection, point)
    threes = d.class_index == 3
    assert threes.any() and not d.answered[threes].any()
    i = int(np.flatnonzero(threes)[0])
    answer = answers(d, [str(k) for k in range(10)], [f"r{j}" for j in range(len(d))])[i]
    assert answer["decision"] == "abstain" and answer["threshold"] is None
    assert "never answers class 3" in answer["reason"]
    other = int(np.flatnonzero(~threes)[0])  # another class: its own threshold, in the answer
    k = int(d.class_index[other])
    assert (
        answers(d, [str(j) for j in range(10)], [f"r{j}" for j in range(len(d))])[other]["threshold"]
        == (point.extra["class_thresholds"][k])
    )


def test_per_class_risk_points_carry_a_certificate_per_class(version_dir: Path) -> None:
    run_calibration(
        version_dir.parent, dataset="digits", coverages=[], risks=[0.2], score="softmax_response",
        per_class=True, delta=0.1,
    )  # fmt: skip
    (point,) = load_calibration(version_dir / "calibration.json").operating_points
    sr, predicted = _sr_and_classes(version_dir, load_digits("val").x)
    errors = predicted != load_digits("val").y
    for entry, t in zip(point.extra["per_class"], point.extra["class_thresholds"], strict=True):
        if t is None:
            continue
        mine = (predicted == entry["class_index"]) & (sr >= t)
        # the recorded p-value is the binomial tail of this class's answered errors, and <= δ
        p = binomial_tail_p_value(int(errors[mine].sum()), int(mine.sum()), 0.2)
        assert entry["p_value"] == pytest.approx(p) and p <= 0.1


def test_the_selective_graph_decides_with_the_class_thresholds(version_dir: Path) -> None:
    run_calibration(version_dir.parent, dataset="digits", coverages=[0.8, 0.95], score="softmax_response",
                    per_class=True)  # fmt: skip
    calibration = load_calibration(version_dir / "calibration.json")
    export_selective_entry(version_dir.parent)
    selective = version_dir.parent.parent / f"{version_dir.parent.name}-selective" / "1" / "model.onnx"
    x = load_digits("test").x
    accept = ort.InferenceSession(str(selective), providers=["CPUExecutionProvider"]).run(
        ["accept"], {"pixels": x}
    )[0]
    out = OnnxModel(version_dir / "model.onnx").run(x)
    for column, point in enumerate(calibration.operating_points):
        want = decide_arrays(out.logits, out.selection, point).answered
        np.testing.assert_array_equal(accept[:, column], want)
        assert 0 < want.sum() < len(want)


def _violations(p_value, trials: int = 300, delta: float = 0.1, r: float = 0.1) -> np.ndarray:
    """Per class, the share of calibration draws whose certified threshold has a true risk above r.

    Synthetic: 3 classes, scores uniform in [0, 1], P(error | s) = a_k (1 - s) with a = (0.1, 0.3,
    0.6); the true selective risk at threshold t is a_k (1 - t) / 2, so class 0 is within r
    everywhere, class 2 only for t >= 2/3.
    """
    rng = np.random.default_rng(11)
    a = np.array([0.1, 0.3, 0.6])
    out = np.zeros(3)
    for _ in range(trials):
        n = 1_500
        predicted = rng.integers(0, 3, size=n)
        scores = rng.random(n)
        errors = (rng.random(n) < a[predicted] * (1 - scores)).astype(np.int64)
        point, _ = per_class_point(
            method="risk", target=r, scores=scores, errors=errors, predicted=predicted, num_classes=3,
            delta=delta, delta_per_score=delta, score="softmax_response", scale="probability",
            risk_method="ltt", p_value=p_value,
        )  # fmt: skip
        if point is None:  # no class certified (an error among each class's first answers): no violation
            continue
        for k, t in enumerate(point.extra["class_thresholds"]):
            out[k] += t is not None and a[k] * (1 - t) / 2 > r
    return out / trials


def test_each_class_risk_guarantee_fails_at_most_delta_of_the_time() -> None:
    rates = _violations("exact")
    assert (rates <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 300)).all(), rates


def test_a_p_value_that_ignores_the_sample_size_breaks_the_guarantee() -> None:
    """The deliberately wrong p-value: "reject when the measured risk is at most r", which is a
    coin flip at the boundary rather than a test at level δ."""

    def naive(errors: int, n: int, r: float) -> float:
        return 0.0 if errors <= r * n else 1.0

    rates = _violations(naive, trials=100)
    assert rates[1] > 0.3 and rates[2] > 0.3, rates
