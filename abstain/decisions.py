"""The numeric core of a predict-or-abstain decision, shared by serving and ``abstain predict``.

Pure numpy, torch-free and bentoml-free, so that the offline stage (calibration/) and the
service (serving/) decide with the same lines. A sample is answered iff
``score >= threshold`` (``abstain.operating_points``), with the score named by the operating
point (``abstain.selective.selection_scores``: the selection head g of SelectiveNet, Geifman &
El-Yaniv ICML 2019; the softmax response; or their geometric mean). The candidate class is the
arg-max of the prediction head f and its softmax probability is the ``confidence``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from abstain.operating_points import OperatingPoint
from abstain.selective import selection_scores, softmax


@dataclass(frozen=True)
class Decisions:
    """Decisions for ``N`` samples as arrays (row ``i`` = sample ``i``).

    Attributes:
        answered: bool ``[N]``, ``score_value >= threshold``.
        class_index: int ``[N]``, arg-max of the softmax (the label if answered, else the candidate).
        confidence: float64 ``[N]``, the softmax response of ``class_index``.
        selection: float64 ``[N]``, the selection-head output g as given.
        score_value: float64 ``[N]``, the operating point's score.
        threshold: the operating point's threshold.
    """

    answered: np.ndarray
    class_index: np.ndarray
    confidence: np.ndarray
    selection: np.ndarray
    score_value: np.ndarray
    threshold: float


def decide_arrays(logits: np.ndarray, selection: np.ndarray, point: OperatingPoint) -> Decisions:
    """Decide every row of ``logits [N, K]`` with ``selection [N]`` (or ``[N, 1]``) at ``point``.

    Raises:
        ValueError: the shapes do not pair up.
    """
    logits = np.asarray(logits, dtype=np.float64)
    selection = np.asarray(selection, dtype=np.float64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != selection.shape[0]:
        raise ValueError(
            f"logits should be [N, K] and selection [N], but got {list(logits.shape)} "
            f"and {list(selection.shape)}"
        )
    probs = softmax(logits)  # [N, K]
    top = probs.argmax(axis=1)  # [N]
    confidence = probs[np.arange(len(top)), top]  # [N], the softmax response
    scores = selection_scores(logits, selection, point.score)  # [N]
    return Decisions(
        answered=scores >= point.threshold,
        class_index=top,
        confidence=confidence,
        selection=selection,
        score_value=scores,
        threshold=float(point.threshold),
    )
