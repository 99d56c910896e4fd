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
from typing import Any

import numpy as np

from abstain.operating_points import OperatingPoint
from abstain.selective import selection_scores, softmax

PREDICT = "predict"
ABSTAIN = "abstain"
DECISIONS = (PREDICT, ABSTAIN)


def decide(
    logits: np.ndarray,
    selection: np.ndarray,
    point: OperatingPoint,
    class_names: Sequence[str],
    answered: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One decision dict per row of ``logits``.

    Args:
        logits: float ``[N, K]`` prediction-head outputs.
        selection: float ``[N]`` (or ``[N, 1]``) selection-head outputs g in [0, 1].
        point: the operating point whose ``score`` and ``threshold`` decide.
        class_names: ``K`` labels, index ``i`` names class ``i``.
        answered: bool ``[N]``, the decision already taken for ``point`` (a selective graph's
            ``accept`` column, ``serving/selective_remote.py``); default ``score >= threshold``.

    Returns:
        ``N`` dicts. Always: ``decision``, ``confidence`` (softmax response), ``selection`` (g),
        ``score`` (name), ``score_value``, ``threshold``, ``operating_point``. Predictions add
        ``label`` and ``class_index``; abstentions add ``reason`` and ``candidate``
        (``label``, ``class_index``, ``confidence``) for human review.
    """
    logits = np.asarray(logits, dtype=np.float64)
    selection = np.asarray(selection, dtype=np.float64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != selection.shape[0]:
        raise ValueError(
            f"logits should be [N, K] and selection [N], but got {list(logits.shape)} "
            f"and {list(selection.shape)}"
        )
    if logits.shape[1] != len(class_names):
        raise ValueError(
            f"the graph gives {logits.shape[1]} classes but {len(class_names)} class names were given"
        )
    probs = softmax(logits)  # [N, K]
    top = probs.argmax(axis=1)  # [N]
    confidence = probs[np.arange(len(top)), top]  # [N], the softmax response
    scores = selection_scores(logits, selection, point.score)  # [N]
    answered = scores >= point.threshold if answered is None else np.asarray(answered, bool).reshape(-1)
    out: list[dict[str, Any]] = []
    for i in range(len(top)):
        k = int(top[i])
        item: dict[str, Any] = {
            "decision": PREDICT if answered[i] else ABSTAIN,
            "confidence": float(confidence[i]),
            "selection": float(selection[i]),
            "score": point.score,
            "score_value": float(scores[i]),
            "threshold": float(point.threshold),
            "operating_point": point.name,
        }
        if answered[i]:
            item["label"] = class_names[k]
            item["class_index"] = k
        else:
            item["reason"] = (
                f"{point.score} score {scores[i]:.4f} below threshold {point.threshold:.4f} "
                f"of operating point {point.name}"
            )
            item["candidate"] = {
                "label": class_names[k],
                "class_index": k,
                "confidence": float(confidence[i]),
            }
        out.append(item)
    return out
