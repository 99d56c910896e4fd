"""Append the calibrated predict-or-abstain decision to an exported graph (pure ``onnx`` + numpy).

The base graph maps ``pixels [N, C, H, W]`` to ``logits [N, K]`` and ``selection [N]``. The
selective graph keeps every base output and adds, for the ``P`` operating points of a
``calibration.json`` (baked in as constants, in the calibration's order):

* ``class_index`` int64 ``[N]`` — arg-max of the softmax (first index on ties, as numpy);
* ``confidence`` float64 ``[N]`` — the softmax response (max probability);
* ``scores`` float64 ``[N, P]`` — each point's score (``abstain.risk_coverage.selection_scores``);
* ``accept`` bool ``[N, P]`` — ``scores >= thresholds``: answer with point ``p`` (a
  class-conditional point compares with its threshold for the sample's ``class_index``).

Exactness. The service (``serving/http/answers.py``) casts the float32 outputs to float64 and
compares a float64 score with the float64 threshold. The decision here does the same: the
outputs are cast to DOUBLE (exact: every float32 is a float64), the scores are computed in
float64 with numpy's formula, step by step, and compared with the float64 thresholds stored as
DOUBLE constants (bit-for-bit the JSON value). For the ``selection`` score the graph's score
*is* ``float64(g)``, so ``accept`` equals the service's decision for every possible input,
including a score exactly at the threshold. For the softmax scores (``softmax_response``,
``combined``, ``margin``, ``gini``) the float64 ``exp``/sum of ONNX Runtime may differ from
numpy's by an ulp (~1e-16), so a decision could differ only for a score within a few float64
ulps of its threshold (none on the digits test split; tested). Storing a float32 threshold (the
smallest float32 ``>= t``) would be equally exact for ``selection`` but not for the softmax
scores, which would lose 9 digits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from abstain.contract import (
    ACCEPT_NAME,
    CLASS_INDEX_NAME,
    CONFIDENCE_NAME,
    LOGITS_NAME,
    META_SELECTIVE,
    SCORE_COMBINED,
    SCORE_GINI,
    SCORE_MARGIN,
    SCORE_NAMES,
    SCORE_SELECTION,
    SCORE_SOFTMAX_RESPONSE,
    SCORES_NAME,
    SELECTION_LOGIT_NAME,
    SELECTION_NAME,
    SELECTIVE_OUTPUT_NAMES,
)
from abstain.decisions import class_thresholds
from abstain.operating_points import Calibration, OperatingPoint, check_score_scale

#: Prefix of every node and tensor this module adds, so none collides with the base graph's.
PREFIX = "abstain_decision/"
#: Lowest opset whose operators (GreaterOrEqual, Clip with inputs, ReduceSum axes input) we use.
MIN_OPSET = 13


@dataclass(frozen=True)
class SelectiveInfo:
    """What the selective graph was made from (stored as JSON under ``META_SELECTIVE``)."""

    base_graph_sha256: str
    calibration_sha256: str
    default_operating_point: str
    operating_points: tuple[dict, ...]  # name, score, threshold, method, targets; graph order

    def to_json(self) -> str:
        return json.dumps(
            {
                "base_graph_sha256": self.base_graph_sha256,
                "calibration_sha256": self.calibration_sha256,
                "default_operating_point": self.default_operating_point,
                "operating_points": list(self.operating_points),
                "outputs": list(SELECTIVE_OUTPUT_NAMES),
                "decision": "accept[:, p] = scores[:, p] >= threshold[p], float64",
            },
            sort_keys=True,
        )

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> SelectiveInfo:
        """Read the info back from a selective graph; ``ValueError`` if it is not one."""
        props = {p.key: p.value for p in model.metadata_props}
        if META_SELECTIVE not in props:
            raise ValueError(
                f"the graph has no {META_SELECTIVE} metadata: it is not a selective graph "
                "(make one with `abstain export-selective MODEL_DIR`)"
            )
        raw = json.loads(props[META_SELECTIVE])
        return cls(
            raw["base_graph_sha256"],
            raw["calibration_sha256"],
            raw["default_operating_point"],
            tuple(raw["operating_points"]),
        )


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the base graph imports no default-domain opset")


def _reduce(op: str, x: str, out: str, opset: int, axes_const: str) -> onnx.NodeProto:
    """``op`` over axis 1 keeping dims; ReduceMax takes ``axes`` as an input only from opset 18."""
    if op == "ReduceSum" or opset >= 18:
        return helper.make_node(op, [x, axes_const], [out], keepdims=1, name=PREFIX + out)
    return helper.make_node(op, [x], [out], axes=[1], keepdims=1, name=PREFIX + out)


def _class_threshold_table(points: Sequence[OperatingPoint]) -> np.ndarray | None:
    """float64 ``[K, P]``: point ``p``'s threshold for a sample of class ``k`` (its class threshold
    for a class-conditional point, ``inf`` where never answered; its one threshold otherwise);
    ``None`` when no point is class-conditional."""
    tables = [class_thresholds(p) for p in points]
    sizes = {t.shape[0] for t in tables if t is not None}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(f"class-conditional points with different class counts {sorted(sizes)}")
    k = sizes.pop()
    columns = [
        np.full(k, p.threshold, dtype=np.float64) if t is None else t
        for p, t in zip(points, tables, strict=True)
    ]
    return np.stack(columns, axis=1)


def point_records(calibration: Calibration) -> tuple[dict, ...]:
    """The operating points as stored in the metadata, in the calibration's order."""
    return tuple(
        {
            "name": p.name,
            "method": p.method,
            "score": p.score,
            "threshold": p.threshold,
            "target_coverage": p.target_coverage,
            "target_risk": p.target_risk,
            "delta": p.delta,
            "coverage": p.coverage,  # measured on the calibration data
            **({"class_thresholds": p.extra["class_thresholds"]} if "class_thresholds" in p.extra else {}),
        }
        for p in calibration.operating_points
    )


def build_selective_model(
    base: onnx.ModelProto, calibration: Calibration, info: SelectiveInfo
) -> onnx.ModelProto:
    """A copy of ``base`` with the decision for every operating point of ``calibration``.

    Args:
        base: the exported graph (outputs ``logits [N, K]`` and ``selection [N]``, float32).
        calibration: its calibration; its P operating points become the columns of
            ``scores``/``accept`` in the same order.
        info: provenance stored as metadata (:class:`SelectiveInfo`).

    Raises:
        ValueError: the base graph lacks ``logits``/``selection``, already has a decision
            output, or uses an opset older than ``MIN_OPSET``.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    names = [o.name for o in graph.output]
    for required in (LOGITS_NAME, SELECTION_NAME):
        if required not in names:
            raise ValueError(f"the base graph should output {required!r}, but its outputs are {names}")
    clash = sorted(set(names) & set(SELECTIVE_OUTPUT_NAMES))
    if clash:
        raise ValueError(f"the base graph already outputs {clash}: is it a selective graph already?")
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"the base graph's opset should be >= {MIN_OPSET}, but it is {opset}")
    points = calibration.operating_points
    for p in points:
        if p.score not in SCORE_NAMES:
            raise ValueError(f"operating point {p.name!r} has score {p.score!r}; valid: {SCORE_NAMES}")
    # on a graph with selection_logit the selection score is the logit z (thresholds on
    # the logit scale); its float32 → float64 cast is exact, as numpy's. combined would need
    # numpy's float64 sigmoid(z) bit for bit, which this graph does not reproduce: refused.
    has_logit = SELECTION_LOGIT_NAME in names
    check_score_scale(calibration, has_logit, "calibration")
    if has_logit and any(p.score == SCORE_COMBINED for p in points):
        raise ValueError(
            f"the base graph outputs {SELECTION_LOGIT_NAME!r} and an operating point uses the "
            f"{SCORE_COMBINED!r} score: a selective graph supports {SCORE_SELECTION!r} and "
            f"{SCORE_SOFTMAX_RESPONSE!r} there; serve it with `abstain serve` instead"
        )

    def name(s: str) -> str:
        return PREFIX + s

    # class-conditional points (abstain calibrate --per-class): a [K, P] table of thresholds,
    # gathered by each sample's class; else [P], broadcast over [N, P]
    per_class = _class_threshold_table(points)
    thresholds = np.array([p.threshold for p in points], dtype=np.float64) if per_class is None else per_class
    consts = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), name("axis1")),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), name("column")),
        # float64, bit-for-bit the calibration's thresholds (inf: a class never answered)
        numpy_helper.from_array(thresholds, name("thresholds")),
    ]
    graph.initializer.extend(consts)
    a1 = name("axis1")
    # ReduceMax takes ``axes`` as an attribute before opset 18 (an input from 18 on)
    confidence_attrs: dict[str, Any] = {} if opset >= 18 else {"axes": [1]}
    nodes = [
        # numpy's path in abstain.risk_coverage.softmax, in float64: z - max, exp, / sum
        helper.make_node(
            "Cast", [LOGITS_NAME], [name("logits64")], to=TensorProto.DOUBLE, name=name("cast_logits")
        ),
        _reduce("ReduceMax", name("logits64"), name("zmax"), opset, a1),
        helper.make_node("Sub", [name("logits64"), name("zmax")], [name("z")], name=name("sub")),
        helper.make_node("Exp", [name("z")], [name("e")], name=name("exp")),
        _reduce("ReduceSum", name("e"), name("esum"), opset, a1),
        helper.make_node("Div", [name("e"), name("esum")], [name("probs")], name=name("div")),
        helper.make_node(
            "ArgMax",
            [name("probs")],
            [CLASS_INDEX_NAME],
            axis=1,
            keepdims=0,
            select_last_index=0,
            name=name("argmax"),
        ),
        helper.make_node(
            "ReduceMax",
            [name("probs"), a1] if opset >= 18 else [name("probs")],
            [CONFIDENCE_NAME],
            keepdims=0,
            name=name("confidence"),
            **confidence_attrs,
        ),
        helper.make_node(
            "Cast",
            [SELECTION_LOGIT_NAME if has_logit else SELECTION_NAME],
            [name("g_flat")],
            to=TensorProto.DOUBLE,
            name=name("cast_selection"),
        ),
    ]
    columns: dict[str, str] = {}  # score name -> [N] tensor
    needed = {p.score for p in points}
    if SCORE_COMBINED in needed:
        # selection is [N] (or [N, 1] in older exports): flatten to [N]
        nodes.append(
            helper.make_node(
                "Reshape", [name("g_flat"), name("g_shape")], [name("g")], name=name("reshape_g")
            )
        )
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name("g_shape")))
    columns[SCORE_SELECTION] = name("g_flat")
    columns[SCORE_SOFTMAX_RESPONSE] = CONFIDENCE_NAME
    if SCORE_COMBINED in needed:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(0.0, dtype=np.float64), name("zero")),
                numpy_helper.from_array(np.array(1.0, dtype=np.float64), name("one")),
            ]
        )
        # sqrt(clip(g, 0, 1) * softmax_response), as abstain.risk_coverage.selection_scores
        nodes += [
            helper.make_node(
                "Clip", [name("g"), name("zero"), name("one")], [name("g_clip")], name=name("clip_g")
            ),
            helper.make_node("Mul", [name("g_clip"), CONFIDENCE_NAME], [name("g_sr")], name=name("mul")),
            helper.make_node("Sqrt", [name("g_sr")], [name("combined")], name=name("sqrt")),
        ]
        columns[SCORE_COMBINED] = name("combined")
    if SCORE_MARGIN in needed:
        # p_(1) - p_(2), as abstain.risk_coverage.top_two_margin: the top two, largest first
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([2], dtype=np.int64), name("two")),
                numpy_helper.from_array(np.array(0, dtype=np.int64), name("first")),
                numpy_helper.from_array(np.array(1, dtype=np.int64), name("second")),
            ]
        )
        nodes += [
            helper.make_node(
                "TopK", [name("probs"), name("two")], [name("top2"), name("top2_index")], axis=1,
                largest=1, sorted=1, name=name("top2"),
            ),
            helper.make_node("Gather", [name("top2"), name("first")], [name("p1")], axis=1, name=name("p1")),
            helper.make_node("Gather", [name("top2"), name("second")], [name("p2")], axis=1, name=name("p2")),
            helper.make_node("Sub", [name("p1"), name("p2")], [name("margin")], name=name("margin")),
        ]  # fmt: skip
        columns[SCORE_MARGIN] = name("margin")
    if SCORE_GINI in needed:
        # sum_k p_k^2, as abstain.risk_coverage.selection_scores
        nodes += [
            helper.make_node("Mul", [name("probs"), name("probs")], [name("p_sq")], name=name("p_sq")),
            helper.make_node("ReduceSum", [name("p_sq"), a1], [name("gini")], keepdims=0, name=name("gini")),
        ]
        columns[SCORE_GINI] = name("gini")
    # each distinct score once as an [N, 1] column, stacked [N, S]; one Gather picks the column
    # of every operating point ([N, P]): fewer nodes than a column per point (the per-node
    # dispatch cost is what the decision costs at batch 1, see benchmarks/selective_graph.py)
    distinct = [s for s in SCORE_NAMES if s in needed]
    column_names = []
    for s in distinct:
        col = name(f"column_{s}")
        nodes.append(
            helper.make_node("Reshape", [columns[s], name("column")], [col], name=name(f"reshape_{s}"))
        )
        column_names.append(col)
    if len(column_names) > 1:
        nodes.append(helper.make_node("Concat", column_names, [name("stacked")], axis=1, name=name("concat")))
    stacked = column_names[0] if len(column_names) == 1 else name("stacked")
    graph.initializer.append(
        numpy_helper.from_array(
            np.array([distinct.index(p.score) for p in points], dtype=np.int64), name("point_score")
        )
    )
    nodes += [
        helper.make_node(
            "Gather", [stacked, name("point_score")], [SCORES_NAME], axis=1, name=name("gather")
        ),
    ]
    held_to = name("thresholds")
    if per_class is not None:  # row k of the table for a sample of class k: [N, P]
        held_to = name("held_to")
        nodes.append(
            helper.make_node(
                "Gather", [name("thresholds"), CLASS_INDEX_NAME], [held_to], axis=0, name=name("per_class")
            )
        )
    nodes.append(
        helper.make_node("GreaterOrEqual", [SCORES_NAME, held_to], [ACCEPT_NAME], name=name("accept"))
    )
    graph.node.extend(nodes)
    batch = "batch"
    graph.output.extend(
        [
            helper.make_tensor_value_info(CLASS_INDEX_NAME, TensorProto.INT64, [batch]),
            helper.make_tensor_value_info(CONFIDENCE_NAME, TensorProto.DOUBLE, [batch]),
            helper.make_tensor_value_info(SCORES_NAME, TensorProto.DOUBLE, [batch, len(points)]),
            helper.make_tensor_value_info(ACCEPT_NAME, TensorProto.BOOL, [batch, len(points)]),
        ]
    )
    helper.set_model_props(
        model, {**{p.key: p.value for p in base.metadata_props}, META_SELECTIVE: info.to_json()}
    )
    onnx.checker.check_model(model, full_check=True)
    return model
