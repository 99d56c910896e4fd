"""The service's decision path, composed as the service composes it, for tests that check answers.

``abstain.serving.service`` decides a forward pass with :func:`abstain.decisions.decide_arrays`
(given a selective graph's decision, ``answered``, when Triton took it) and builds the answers
with :func:`abstain.serving.http.answers.answers`; :func:`decide` is those two calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from abstain.decisions import decide_arrays
from abstain.operating_points import OperatingPoint
from abstain.serving.http.answers import answers


def decide(
    logits: np.ndarray,
    selection: np.ndarray,
    point: OperatingPoint,
    class_names: Sequence[str],
    answered: np.ndarray | None = None,
    selection_logit: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The answers for ``logits [N, K]`` and ``selection [N]``, without their request ids."""
    if np.shape(logits)[1] != len(class_names):
        raise ValueError(
            f"the graph gives {np.shape(logits)[1]} classes but {len(class_names)} class names were given"
        )
    d = decide_arrays(logits, selection, point, selection_logit, answered=answered)
    ids = [f"r{i}" for i in range(len(d))]
    return [{k: v for k, v in a.items() if k != "request_id"} for a in answers(d, class_names, ids)]
