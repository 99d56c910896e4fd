"""``abstain.decisions.decide_arrays``: numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.decisions import decide_arrays
from abstain.operating_points import OperatingPoint


def point(score: str, threshold: float) -> OperatingPoint:
    return OperatingPoint(name="p", method="coverage", score=score, threshold=threshold)


def test_selection_score_answers_at_or_above_the_threshold() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    d = decide_arrays(logits, np.array([0.9, 0.2, 0.5]), point("selection", 0.5))
    assert d.answered.tolist() == [True, False, True]  # 0.5 >= 0.5 is answered
    assert d.class_index.tolist() == [0, 0, 1]  # a tie goes to the first class (arg-max)
    # softmax response: e^2 / (1 + e^2), 1/2, e^3 / (1 + e^3)
    e2, e3 = math.exp(2), math.exp(3)
    assert d.confidence == pytest.approx([e2 / (1 + e2), 0.5, e3 / (1 + e3)])
    assert d.score_value.tolist() == [0.9, 0.2, 0.5] and d.point.threshold == 0.5


def test_softmax_response_and_combined_scores() -> None:
    logits = np.array([[2.0, 0.0]])
    sr = math.exp(2) / (1 + math.exp(2))  # 0.8808
    assert decide_arrays(logits, np.array([0.1]), point("softmax_response", 0.88)).answered.tolist() == [True]
    combined = decide_arrays(logits, np.array([[0.64]]), point("combined", 0.75))
    assert combined.score_value == pytest.approx([math.sqrt(0.64 * sr)])  # 0.7508
    assert combined.answered.tolist() == [True]


def test_shapes_must_pair_up() -> None:
    with pytest.raises(ValueError, match=r"logits should be \[N, K\] and selection \[N\]"):
        decide_arrays(np.zeros((3, 2)), np.zeros(2), point("selection", 0.5))
