"""Graph outputs + a calibrated operating point → one predict-or-abstain decision per image.

Pure numpy, no I/O: the service, the Triton backend test and the benchmark all turn
``(logits [N, K], selection [N])`` into JSON-ready dicts through :func:`decide`.

The decision itself is :func:`abstain.decisions.decide_arrays` (shared with ``abstain
predict``): a sample is answered iff ``score >= threshold``, with the score named by the
operating point. The prediction is the arg-max of the prediction head f; its softmax probability is
reported as ``confidence`` whether or not the sample is answered, so that a human reviewer
sees the model's top candidate for an abstention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from abstain.decisions import Decisions, decide_arrays
from abstain.operating_points import OperatingPoint

PREDICT = "predict"
ABSTAIN = "abstain"
DECISIONS = (PREDICT, ABSTAIN)


def decide(
    logits: np.ndarray,
    selection: np.ndarray,
    point: OperatingPoint,
    class_names: Sequence[str],
    answered: np.ndarray | None = None,
    selection_logit: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One decision dict per row of ``logits``.

    Args:
        logits: float ``[N, K]`` prediction-head outputs.
        selection: float ``[N]`` (or ``[N, 1]``) selection-head outputs g in [0, 1].
        point: the operating point whose ``score`` and ``threshold`` decide.
        class_names: ``K`` labels, index ``i`` names class ``i``.
        answered: bool ``[N]``, the decision already taken for ``point`` (a selective graph's
            ``accept`` column, ``serving/triton/selective_backend.py``); default ``score >= threshold``.
        selection_logit: float ``[N]`` g's logit z when the graph exports it; the
            ``selection`` score is then z (``score_value`` and ``threshold`` are logits).

    Returns:
        ``N`` dicts. Always: ``decision``, ``confidence`` (softmax response), ``selection`` (g),
        ``score`` (name), ``score_value``, ``threshold``, ``operating_point``. Predictions add
        ``label`` and ``class_index``; abstentions add ``reason`` and ``candidate``
        (``label``, ``class_index``, ``confidence``) for human review.
    """
    d = decide_arrays(logits, selection, point, selection_logit)  # checks the shapes
    if answered is not None:  # Triton decided (a selective entry): its accept column wins
        d = dataclasses.replace(d, answered=np.asarray(answered, dtype=bool).reshape(-1))
    if np.shape(logits)[1] != len(class_names):
        raise ValueError(
            f"the graph gives {np.shape(logits)[1]} classes but {len(class_names)} class names were given"
        )
    return answers(d, class_names)


def answers(d: Decisions, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON-ready dicts of :func:`decide` from :func:`abstain.decisions.decide_arrays`' arrays.

    Arrays become Python numbers in one ``tolist()`` each rather than one ``float()`` per image
    and field (the per-request cost the service pays on its event loop); the loop only
    assembles the dicts.
    """
    point = d.point
    threshold, name, score = float(point.threshold), point.name, point.score
    out: list[dict[str, Any]] = []
    for i, (k, conf, g, value, ok) in enumerate(
        zip(
            d.class_index.tolist(),
            d.confidence.tolist(),
            d.selection.tolist(),
            d.score_value.tolist(),
            d.answered.tolist(),
            strict=True,
        )
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
            item["reason"] = d.reason(i)
            item["candidate"] = {"label": class_names[k], "class_index": k, "confidence": conf}
        out.append(item)
    return out
