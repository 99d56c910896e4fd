"""A decision taken in a selective graph replaces the threshold test; its scores are the ``score_value``."""

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


def test_a_selective_graphs_scores_and_accept_decide_together_on_the_thresholds_scale(tmp_path) -> None:
    """Issue 18, what the service does with a selective entry (Triton's ``accept`` and ``scores``
    columns into ``decide_arrays``), here with the graph in local ONNX Runtime: the decision and
    its ``score_value`` agree on every image and every point, and a logit point's ``score_value``
    is the graph's ``selection_logit`` (g is 1.0 everywhere on this graph)."""
    import onnxruntime as ort

    from abstain.contract import (
        ACCEPT_NAME,
        CALIBRATION_FILENAME,
        INPUT_NAME,
        LOGITS_NAME,
        MODEL_FILENAME,
        SCORE_SCALE_LOGIT,
        SCORES_NAME,
        SELECTION_LOGIT_NAME,
        SELECTION_NAME,
    )
    from abstain.decisions import decide_arrays
    from abstain.export.selective_entry import export_selective_entry
    from abstain.operating_points import Calibration, save_calibration
    from abstain.risk_coverage import softmax_response
    from abstain.runtime import OnnxModel
    from tests.digits import load_digits
    from tests.graph_factory import write_model_dir

    version = write_model_dir(tmp_path / "models", name="saturated", selection_logit=True, logit_shift=20.0)
    x = load_digits("test").x
    base = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False)
    out = base.run_batched(x)
    points = (
        OperatingPoint(
            "logit",
            "coverage",
            "selection",
            float(np.median(out.selection_logit)),
            extra={"score_scale": SCORE_SCALE_LOGIT},
        ),
        OperatingPoint(
            "sr", "coverage", "softmax_response", float(np.quantile(softmax_response(out.logits), 0.3))
        ),
    )
    calibration = Calibration(base.sha256, operating_points=points, default_operating_point="logit")
    save_calibration(version / CALIBRATION_FILENAME, calibration)
    graph = export_selective_entry(version).model_path
    names = [LOGITS_NAME, SELECTION_NAME, SELECTION_LOGIT_NAME, ACCEPT_NAME, SCORES_NAME]
    logits, g, z, accept, scores = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(
        names, {INPUT_NAME: x}
    )
    assert (g == 1.0).all()
    for p, point in enumerate(points):
        d = decide_arrays(logits, g, point, z, score_value=scores[:, p], answered=accept[:, p])  # agree
        assert d.answered.tolist() == (d.score_value >= point.threshold).tolist()
        assert 0 < d.answered.sum() < len(x)
        if point.score == "selection":
            assert d.score_value.tolist() == z.astype(np.float64).tolist()  # the logit, exactly
            assert point.threshold > 1.0  # on the logit scale: g (1.0) would be below it everywhere
        else:
            np.testing.assert_allclose(d.score_value, softmax_response(logits), rtol=0, atol=1e-12)
