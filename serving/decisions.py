"""Graph outputs + a calibrated operating point → one predict-or-abstain decision per image.

Pure numpy, no I/O: the service, the Triton backend test and the benchmark all turn
``(logits [N, K], selection [N])`` into JSON-ready dicts through :func:`decide`.

A sample is answered iff ``score >= threshold`` (``abstain.operating_points``), with the score
named by the operating point (``abstain.selective.selection_scores``: the selection head g
of SelectiveNet, Geifman & El-Yaniv ICML 2019; the softmax response; or their geometric
mean). The prediction is the arg-max of the prediction head f; its softmax probability is
reported as ``confidence`` whether or not the sample is answered, so that a human reviewer
sees the model's top candidate for an abstention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from abstain.contract import SCORE_COMBINED, SCORE_SELECTION, SCORE_SOFTMAX_RESPONSE
from abstain.operating_points import OperatingPoint
from abstain.selective import selection_scores, softmax

PREDICT = "predict"
ABSTAIN = "abstain"
DECISIONS = (PREDICT, ABSTAIN)


@dataclass(frozen=True)
class DecisionArrays:
    """The numbers behind a batch of decisions (all ``[N]``)."""

    top: np.ndarray  # int, arg-max class of f
    confidence: np.ndarray  # float64, softmax probability of ``top`` (the softmax response)
    selection: np.ndarray  # float64, g
    scores: np.ndarray  # float64, the score the operating point thresholds
    answered: np.ndarray  # bool, ``scores >= threshold``


def decision_arrays(
    logits: np.ndarray, selection: np.ndarray, point: OperatingPoint, num_classes: int
) -> DecisionArrays:
    """Vectorised decisions: softmax once, the operating point's score, the threshold.

    The scores are those of :func:`abstain.selective.selection_scores` (float64, the precision
    calibration used, so that a score on the threshold decides the same way), computed from
    the one softmax: ``softmax_response`` is its row maximum, ``combined`` is
    ``sqrt(clip(g, 0, 1) · softmax_response)``.
    """
    logits = np.asarray(logits)
    selection = np.asarray(selection, dtype=np.float64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != selection.shape[0]:
        raise ValueError(
            f"logits should be [N, K] and selection [N], but got {list(logits.shape)} "
            f"and {list(selection.shape)}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"the graph gives {logits.shape[1]} classes but {num_classes} class names were given"
        )
    probs = softmax(logits)  # [N, K] float64, once
    top = probs.argmax(axis=1)  # [N]
    confidence = probs[np.arange(len(top)), top]  # [N], the softmax response
    if point.score == SCORE_SELECTION:
        scores = selection
    elif point.score == SCORE_SOFTMAX_RESPONSE:
        scores = confidence
    else:  # combined, or an unknown name (refused by selection_scores)
        scores = (
            np.sqrt(np.clip(selection, 0.0, 1.0) * confidence)
            if point.score == SCORE_COMBINED
            else selection_scores(logits, selection, point.score)
        )
    return DecisionArrays(top, confidence, selection, scores, scores >= point.threshold)


def decide(
    logits: np.ndarray, selection: np.ndarray, point: OperatingPoint, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One decision dict per row of ``logits``.

    Args:
        logits: float ``[N, K]`` prediction-head outputs.
        selection: float ``[N]`` (or ``[N, 1]``) selection-head outputs g in [0, 1].
        point: the operating point whose ``score`` and ``threshold`` decide.
        class_names: ``K`` labels, index ``i`` names class ``i``.

    Returns:
        ``N`` dicts. Always: ``decision``, ``confidence`` (softmax response), ``selection`` (g),
        ``score`` (name), ``score_value``, ``threshold``, ``operating_point``. Predictions add
        ``label`` and ``class_index``; abstentions add ``reason`` and ``candidate``
        (``label``, ``class_index``, ``confidence``) for human review.
    """
    return answers(decision_arrays(logits, selection, point, len(class_names)), point, class_names)


def answers(
    arrays: DecisionArrays, point: OperatingPoint, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """The JSON-ready dicts of :func:`decide` from :func:`decision_arrays`' numbers.

    Arrays become Python numbers in one ``tolist()`` each rather than one ``float()`` per
    image and field; the loop only assembles the dicts.
    """
    threshold, name, score = float(point.threshold), point.name, point.score
    out: list[dict[str, Any]] = []
    for k, conf, g, value, ok in zip(
        arrays.top.tolist(),
        arrays.confidence.tolist(),
        arrays.selection.tolist(),
        arrays.scores.tolist(),
        arrays.answered.tolist(),
        strict=True,
    ):
        item: dict[str, Any] = {
            "decision": PREDICT if ok else ABSTAIN,
            "confidence": conf,
            "selection": g,
            "score": score,
            "score_value": value,
            "threshold": threshold,
            "operating_point": name,
        }
        if ok:
            item["label"] = class_names[k]
            item["class_index"] = k
        else:
            item["reason"] = (
                f"{score} score {value:.4f} below threshold {threshold:.4f} of operating point {name}"
            )
            item["candidate"] = {"label": class_names[k], "class_index": k, "confidence": conf}
        out.append(item)
    return out
