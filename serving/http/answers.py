"""The JSON answers of ``POST /predict``, typed: one :class:`Answer` per image.

The decision itself is :func:`abstain.decisions.decide_arrays` — the one decision path of
the service, ``abstain predict`` and the tests; this module only turns its arrays into the
answer's dicts. A sample is answered iff ``score >= threshold``; the arg-max class of the
prediction head f and its softmax probability (``confidence``) are reported for abstentions
too, as the ``candidate`` a human reviewer sees, with the operating point's conformal
prediction set when its calibration has one (:mod:`abstain.conformal`): the classes that hold
the true one for at least ``level`` of the point's abstentions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import numpy as np

from abstain.decisions import Decisions


class PredictionSet(TypedDict):
    """An abstention's conformal set, classes in index order; ``level`` = 1 - alpha (may be empty)."""

    labels: list[str]
    class_indices: list[int]
    level: float
    method: str  # "lac" | "aps"


class _CandidateBase(TypedDict):
    label: str
    class_index: int
    confidence: float


class Candidate(_CandidateBase, total=False):
    """The model's top class for an abstention, for human review, and its prediction set (present
    when the operating point's calibration has sets)."""

    prediction_set: PredictionSet


class _AnswerBase(TypedDict):
    request_id: str
    confidence: float  # softmax response of the top class
    selection: float  # the selection head's g
    score: str  # the name of the score the operating point thresholds
    score_value: float  # that score for this image, on the threshold's scale
    threshold: float | None  # a class-conditional point: the class's (None: never answered)
    operating_point: str


class Prediction(_AnswerBase):
    """An answered image: its ``label`` and ``class_index``."""

    decision: Literal["predict"]
    label: str
    class_index: int


class Abstention(_AnswerBase):
    """An image the service does not answer: ``reason`` says why, ``candidate`` what it would say."""

    decision: Literal["abstain"]
    reason: str
    candidate: Candidate


Answer = Prediction | Abstention


class PredictResponse(TypedDict):
    """The body of a ``POST /predict`` answer."""

    model: str
    version: str
    operating_point: str
    predictions: list[Answer]


def answers(d: Decisions, class_names: Sequence[str], request_ids: Sequence[str]) -> list[Answer]:
    """One :class:`Answer` per decided image, carrying ``request_ids[i]``.

    Each array becomes Python numbers in one ``tolist()`` (not one ``float()`` per image and
    field): this runs on the event loop for small requests.
    """
    point = d.point
    threshold, name, score = float(point.threshold), point.name, point.score
    if len(request_ids) != len(d):
        raise ValueError(f"{len(d)} decisions need {len(d)} request ids, but got {len(request_ids)}")
    conformal = d.point.extra.get("prediction_set")
    sets = d.prediction_set  # bool [N, K]; read for the abstentions only
    # a class-conditional point holds each image to its class's threshold (Decisions.threshold)
    held_to = [threshold] * len(d) if d.thresholds is None else [d.threshold(i) for i in range(len(d))]
    out: list[Answer] = []
    for i, (rid, k, conf, g, value, ok) in enumerate(
        zip(
            request_ids,
            d.class_index.tolist(),
            d.confidence.tolist(),
            d.selection.tolist(),
            d.score_value.tolist(),
            d.answered.tolist(),
            strict=True,
        )
    ):
        if ok:
            out.append(
                Prediction(
                    request_id=rid, decision="predict", confidence=conf, selection=g, score=score,
                    score_value=value, threshold=held_to[i], operating_point=name,
                    label=class_names[k], class_index=k,
                )
            )  # fmt: skip
        else:
            candidate = Candidate(label=class_names[k], class_index=k, confidence=conf)
            if sets is not None and conformal is not None:
                members = np.flatnonzero(sets[i]).tolist()
                candidate["prediction_set"] = PredictionSet(
                    labels=[class_names[j] for j in members], class_indices=members,
                    level=1.0 - float(conformal["alpha"]), method=str(conformal["method"]),
                )  # fmt: skip
            out.append(
                Abstention(
                    request_id=rid, decision="abstain", confidence=conf, selection=g, score=score,
                    score_value=value, threshold=held_to[i], operating_point=name, reason=d.reason(i),
                    candidate=candidate,
                )
            )  # fmt: skip
    return out
