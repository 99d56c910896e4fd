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


def test_a_score_column_computed_where_the_decision_is_taken_is_reported_as_is() -> None:
    """Issue 18: a selective graph's ``scores`` column (here logits z, a selection point on the
    logit scale) is the ``score_value``, not g recomputed from ``selection``."""
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    g = np.array([1.0, 1.0, 1.0])  # saturated: g could not tell the three apart
    z = np.array([18.25, 17.5, 17.75])
    logit_point = point("selection", 17.75)
    d = decide_arrays(logits, g, logit_point, score_value=z)
    assert d.score_value.tolist() == [18.25, 17.5, 17.75] and d.score_value.dtype == np.float64
    assert d.answered.tolist() == [True, False, True]  # 17.75 >= 17.75 is answered
    assert d.selection.tolist() == [1.0, 1.0, 1.0]
    # with the decision taken in the same place: it agrees, and is kept
    kept = decide_arrays(logits, g, logit_point, score_value=z, answered=np.array([True, False, True]))
    assert kept.answered.tolist() == [True, False, True] and kept.score_value.tolist() == z.tolist()
    # without score_value, g is the score: every image at g = 1.0 would be below a logit threshold
    assert decide_arrays(logits, g, logit_point).answered.tolist() == [False, False, False]


def test_a_decision_and_a_score_that_disagree_are_refused() -> None:
    logits = np.zeros((2, 2))
    disagree = r"answered\[1\] = True but score_value\[1\] = 0\.25 < threshold 0\.5"
    with pytest.raises(ValueError, match=disagree):
        decide_arrays(
            logits,
            np.zeros(2),
            point("selection", 0.5),
            score_value=np.array([0.75, 0.25]),
            answered=np.array([True, True]),
        )
    wrong_length = "score_value should have 2 values, one per row of logits, but got 3"
    with pytest.raises(ValueError, match=wrong_length):
        decide_arrays(logits, np.zeros(2), point("selection", 0.5), score_value=np.zeros(3))
    with pytest.raises(ValueError, match="answered should have 2 values"):
        decide_arrays(logits, np.zeros(2), point("selection", 0.5), answered=np.zeros(1, dtype=bool))


def test_a_decision_alone_replaces_the_threshold_test_and_keeps_the_local_score() -> None:
    d = decide_arrays(
        np.zeros((2, 2)), np.array([0.9, 0.1]), point("selection", 0.5), answered=np.array([False, True])
    )
    assert d.answered.tolist() == [False, True] and d.score_value.tolist() == [0.9, 0.1]
