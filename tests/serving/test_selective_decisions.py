"""``decide(..., answered=...)``: a decision taken in a selective graph replaces the threshold test."""

from __future__ import annotations

import numpy as np

from abstain.decisions import ABSTAIN, PREDICT
from abstain.operating_points import OperatingPoint
from tests.answer_helpers import decide


def test_answered_from_the_graph_is_the_decision_and_the_rest_is_unchanged() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    selection = np.array([0.9, 0.1], dtype=np.float32)
    point = OperatingPoint("p", "coverage", "selection", 0.5)
    local = decide(logits, selection, point, ["a", "b"])
    assert [d["decision"] for d in local] == [PREDICT, ABSTAIN]  # 0.9 >= 0.5, 0.1 < 0.5
    # a (deliberately opposite) accept column: the answers follow it, scores are still reported
    flipped = decide(logits, selection, point, ["a", "b"], answered=np.array([False, True]))
    assert [d["decision"] for d in flipped] == [ABSTAIN, PREDICT]
    assert flipped[1]["label"] == "b" and flipped[0]["candidate"]["label"] == "a"
    assert [d["score_value"] for d in flipped] == [d["score_value"] for d in local]
