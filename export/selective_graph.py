"""The calibrated decision as ONNX nodes: ``(logits, selection)`` → class, confidence, scores, accept.

Pure graph building with ``onnx.helper`` (no torch, no file I/O). :func:`append_decision`
adds the decision to a base graph whose outputs are ``logits`` float32 ``[N, K]`` and
``selection`` float32 ``[N]`` (SelectiveNet's heads f and g, Geifman & El-Yaniv, ICML 2019),
keeping every original output. :func:`decision_model` is the same nodes as a standalone
graph fed with ``logits`` and ``selection`` directly, so tests can craft scores at a threshold.

Exactness. The service decides ``score >= threshold`` in float64 (``abstain/decisions.py``):
the float32 head outputs are widened to float64 (exact) and the softmax is computed in
float64. The graph does the same: it casts both heads to float64 *before* any arithmetic and
stores every threshold as the float64 of ``calibration.json``. For the ``selection`` score the
comparison is then bit-for-bit the service's (a cast is exact and ``>=`` is exact), whatever
the threshold. For ``softmax_response`` and ``combined`` the score is the max of ONNX Runtime's
float64 ``Softmax`` (the service's value up to the order of the float64 summation and the
``exp`` implementation), so the two may differ by a few
float64 ulps (~1e-16): only a sample whose score lies within that band of the threshold can
flip. Measured on the digits test split with every image's own score as a threshold (360
thresholds x 360 images): 0 flips for ``selection``, 89 of 129,600 for ``softmax_response`` and
for ``combined``, every one an image whose score *is* the threshold. The
metadata marks each operating point ``exact`` accordingly. Tests check both on the digits test
split and on crafted scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from abstain.contract import (
    ACCEPT_NAME,
    CLASS_INDEX_NAME,
    CONFIDENCE_NAME,
    LOGITS_NAME,
    SCORE_COMBINED,
    SCORE_NAMES,
    SCORE_SELECTION,
    SCORE_SOFTMAX_RESPONSE,
    SCORES_NAME,
    SELECTION_NAME,
)
from abstain.operating_points import OperatingPoint

#: Prefix of every node / intermediate tensor this module adds (no clash with the base graph).
PREFIX = "abstain_decision/"
#: ONNX opset of a standalone decision graph; appended nodes follow the base graph's opset.
DECISION_OPSET = 18
#: Oldest base-graph opset supported (Unsqueeze takes ``axes`` as an input from 13).
MIN_OPSET = 13


def _name(local: str) -> str:
    return PREFIX + local


def decision_nodes(
    points: Sequence[OperatingPoint], opset: int = DECISION_OPSET
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers from ``logits`` [N, K] and ``selection`` [N] to the four outputs.

    Only the score columns some operating point uses are computed (fewer nodes, less latency).
    """
    if not points:
        raise ValueError("a selective graph needs at least one operating point, but got none")
    for point in points:
        if point.score not in SCORE_NAMES:
            raise ValueError(
                f"operating point {point.name!r} has score {point.score!r}; valid: {SCORE_NAMES}"
            )
    used = [s for s in SCORE_NAMES if any(p.score == s for p in points)]
    n = _name
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), n("axis1")),
        # thresholds exactly as calibration.json's float64 values (see module docstring)
        numpy_helper.from_array(np.array([p.threshold for p in points], dtype=np.float64), n("thresholds")),
        # which score column each operating point reads
        numpy_helper.from_array(
            np.array([used.index(p.score) for p in points], dtype=np.int64), n("point_score")
        ),
    ]
    # class_index [N]: first maximal logit, like numpy's argmax (select_last_index=0)
    nodes.append(
        helper.make_node("ArgMax", [LOGITS_NAME], [CLASS_INDEX_NAME], name=n("argmax"), axis=1, keepdims=0)
    )
    # confidence [N] = max softmax in float64 like the service (3 nodes: each node costs ~µs at batch 1)
    nodes += [
        helper.make_node(
            "Cast", [LOGITS_NAME], [n("logits64")], name=n("cast_logits"), to=TensorProto.DOUBLE
        ),
        helper.make_node("Softmax", [n("logits64")], [n("probs")], name=n("softmax"), axis=1),
        helper.make_node(
            "ReduceMax", [n("probs"), n("axis1")], [CONFIDENCE_NAME], name=n("confidence"), keepdims=0
        )
        if opset >= 18  # ReduceMax takes axes as an input from opset 18, as an attribute before
        else helper.make_node(
            "ReduceMax", [n("probs")], [CONFIDENCE_NAME], name=n("confidence"), axes=[1], keepdims=0
        ),
    ]
    columns: dict[str, str] = {SCORE_SOFTMAX_RESPONSE: CONFIDENCE_NAME}
    if SCORE_SELECTION in used or SCORE_COMBINED in used:
        nodes.append(
            helper.make_node(
                "Cast", [SELECTION_NAME], [n("selection64")], name=n("cast_selection"), to=TensorProto.DOUBLE
            )
        )
        columns[SCORE_SELECTION] = n("selection64")
    if SCORE_COMBINED in used:
        # sqrt(clip(g, 0, 1) * softmax_response), as abstain.selective.selection_scores
        nodes += [
            helper.make_node("Min", [n("selection64"), n("one")], [n("g_hi")], name=n("clip_hi")),
            helper.make_node("Max", [n("g_hi"), n("zero")], [n("g_clip")], name=n("clip_lo")),
            helper.make_node("Mul", [n("g_clip"), CONFIDENCE_NAME], [n("g_sr")], name=n("combined_mul")),
            helper.make_node("Sqrt", [n("g_sr")], [n("combined")], name=n("combined")),
        ]
        columns[SCORE_COMBINED] = n("combined")
        inits += [
            numpy_helper.from_array(np.array(1.0, dtype=np.float64), n("one")),
            numpy_helper.from_array(np.array(0.0, dtype=np.float64), n("zero")),
        ]
    # scores [N, P]: the used score columns stacked [N, U], then one column per operating point
    stacked = []
    for score in used:
        nodes.append(
            helper.make_node(
                "Unsqueeze", [columns[score], n("axis1")], [n(f"col_{score}")], name=n(f"col_{score}")
            )
        )
        stacked.append(n(f"col_{score}"))
    if len(stacked) > 1:
        nodes.append(helper.make_node("Concat", stacked, [n("stacked")], name=n("stacked"), axis=1))
    nodes += [
        helper.make_node(
            "Gather",
            [n("stacked") if len(stacked) > 1 else stacked[0], n("point_score")],
            [SCORES_NAME],
            name=n("scores"),
            axis=1,
        ),
        # accept [N, P] = scores >= thresholds, broadcast over the batch
        helper.make_node("GreaterOrEqual", [SCORES_NAME, n("thresholds")], [ACCEPT_NAME], name=n("accept")),
    ]
    return nodes, inits


def decision_outputs(num_points: int) -> list[onnx.ValueInfoProto]:
    """The four outputs' declarations (batch dimension ``batch``)."""
    return [
        helper.make_tensor_value_info(CLASS_INDEX_NAME, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(CONFIDENCE_NAME, TensorProto.DOUBLE, ["batch"]),
        helper.make_tensor_value_info(SCORES_NAME, TensorProto.DOUBLE, ["batch", num_points]),
        helper.make_tensor_value_info(ACCEPT_NAME, TensorProto.BOOL, ["batch", num_points]),
    ]


def append_decision(base: onnx.ModelProto, points: Sequence[OperatingPoint]) -> onnx.ModelProto:
    """A copy of ``base`` with the decision for ``points`` appended; the original outputs stay first.

    Raises ``ValueError`` if ``base`` lacks ``logits``/``selection`` outputs or already has an
    output of one of the new names, or if its default-domain opset is older than ``MIN_OPSET``
    (the nodes follow the base graph's opset; ``onnx.checker`` checks the result).
    """
    outputs = [o.name for o in base.graph.output]
    for needed in (LOGITS_NAME, SELECTION_NAME):
        if needed not in outputs:
            raise ValueError(f"the base graph should have a {needed!r} output, but its outputs are {outputs}")
    clash = [o for o in outputs if o in (CLASS_INDEX_NAME, CONFIDENCE_NAME, SCORES_NAME, ACCEPT_NAME)]
    if clash:
        raise ValueError(f"the base graph already has output(s) {clash}: is it a selective graph already?")
    opsets = {o.domain: o.version for o in base.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise ValueError(
            f"the base graph uses ONNX opset {opset}; the decision needs opset >= {MIN_OPSET}: "
            "re-export it with the current `abstain export` (or convert it with onnx.version_converter)"
        )
    model = onnx.ModelProto()
    model.CopyFrom(base)
    nodes, inits = decision_nodes(points, opset)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.output.extend(decision_outputs(len(points)))
    return model


def decision_model(
    points: Sequence[OperatingPoint], num_classes: int, opset: int = DECISION_OPSET
) -> onnx.ModelProto:
    """The decision alone: inputs ``logits`` float32 [N, K] and ``selection`` float32 [N]."""
    nodes, inits = decision_nodes(points, opset)
    graph = helper.make_graph(
        nodes,
        "abstain_decision",
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", num_classes]),
            helper.make_tensor_value_info(SELECTION_NAME, TensorProto.FLOAT, ["batch"]),
        ],
        decision_outputs(len(points)),
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
