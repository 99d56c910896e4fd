"""Throwaway contract-conformant ONNX graphs for tests (no torch, built in milliseconds).

Until the shipped ``models/digits`` exists (train → export), calibration, evaluation and
serving tests need a graph that follows ``abstain.contract`` exactly:

* one input ``pixels`` float32 ``[N, C, H, W]`` in [0, 1];
* ``logits`` float32 ``[N, K]``: a linear classifier ``flatten(x) @ W + b``;
* ``selection`` float32 ``[N]``: ``sigmoid(flatten(x) @ w_g + b_g)`` reshaped to ``[N]``;
* metadata ``abstain.input_spec``, ``abstain.class_names`` (and optionally the training
  data's fingerprint), as ``abstain.contract`` specifies.

The weights are fitted in numpy on ``load_digits("train")`` (resized to the requested input
spec), so that the scores are *informative*: the classifier is ridge least squares fitted on
one half of the training split, and the selection head is a logistic regression of "the
classifier was right" fitted on the other half (so it sees honest, out-of-sample mistakes).
Everything is deterministic: the same arguments give byte-identical graphs.

Usage (from any test; run pytest as ``python -m pytest`` from the repository root)::

    from tests.graph_factory import write_model_dir
    version_dir = write_model_dir(tmp_path / "models")   # tmp/models/digits/1/model.onnx
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from abstain.contract import (
    DEFAULT_MODEL_NAME,
    INPUT_NAME,
    LABELS_FILENAME,
    LOGITS_NAME,
    META_CLASS_NAMES,
    META_INPUT_SPEC,
    META_TRAIN_DATA_FINGERPRINT,
    MODEL_FILENAME,
    SELECTION_LOGIT_NAME,
    SELECTION_NAME,
    TRITON_CONFIG_FILENAME,
    InputSpec,
)
from abstain.datasets import DIGITS_CLASS_NAMES
from tests.digits import load_digits

#: ONNX opset / IR version: old enough for every onnxruntime and Triton we may meet.
OPSET = 17
IR_VERSION = 8
#: The digits graph's input: one grey 8×8 channel, no normalisation.
DIGITS_SPEC = InputSpec(1, 8, 8)


def resize_digits(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Nearest-neighbour resize of digits ``[N, 1, 8, 8]`` to ``[N, C, H, W]`` of ``spec``.

    Channels are copies of the grey image (so an RGB graph sees grey digits).
    """
    rows = np.arange(spec.height) * x.shape[2] // spec.height
    cols = np.arange(spec.width) * x.shape[3] // spec.width
    grey = x[:, :, rows][:, :, :, cols]  # [N, 1, H, W]
    return np.repeat(grey, spec.channels, axis=1).astype(np.float32)


def _fit_logistic(
    features: np.ndarray, target: np.ndarray, steps: int = 300, lr: float = 0.5, l2: float = 1e-3
) -> tuple[np.ndarray, float]:
    """Logistic regression by full-batch gradient descent: ``features [N, D]``, ``target [N]`` in {0, 1}."""
    n, d = features.shape
    w = np.zeros(d)
    b = float(np.log((target.mean() + 1e-3) / (1 - target.mean() + 1e-3)))
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(features @ w + b)))
        grad = p - target
        w -= lr * (features.T @ grad / n + l2 * w)
        b -= lr * float(grad.mean())
    return w, b


@functools.cache
def fitted_weights(
    spec: InputSpec = DIGITS_SPEC, ridge: float = 30.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(W [D, 10], b [10], w_g [D], b_g)`` fitted on the digits training split resized to ``spec``.

    ``ridge`` is deliberately strong so the classifier makes some mistakes (a few percent)
    for the selection head and the risk–coverage maths to work on.
    """
    train = load_digits("train")
    x = resize_digits(train.x, spec).reshape(len(train), -1).astype(np.float64)
    y = train.y
    half = np.arange(len(y)) % 2 == 0
    # classifier: ridge regression onto centred one-hot targets (least squares classifier)
    onehot = np.eye(10)[y[half]]
    xa = np.c_[x[half], np.ones(half.sum())]
    reg = ridge * np.eye(xa.shape[1])
    reg[-1, -1] = 0.0  # do not shrink the bias
    wb = np.linalg.solve(xa.T @ xa + reg, xa.T @ (onehot - 0.1))
    w, b = wb[:-1], wb[-1]
    # logits scaled so softmax is neither flat nor saturated
    w, b = 8.0 * w, 8.0 * b
    # selection head: P(classifier right | pixels), fitted on the other half
    other = x[~half]
    correct = ((other @ w + b).argmax(axis=1) == y[~half]).astype(np.float64)
    w_g, b_g = _fit_logistic(other, correct)
    return w.astype(np.float32), b.astype(np.float32), w_g.astype(np.float32), float(b_g)


def random_weights(
    spec: InputSpec, scale: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(W [D, 10], b [10], w_g [D], b_g)`` drawn from ``N(0, scale²)``, biases zero."""
    rng = np.random.default_rng(seed)
    d = spec.channels * spec.height * spec.width
    w = rng.normal(0, scale, (d, 10)).astype(np.float32)
    return w, np.zeros(10, np.float32), rng.normal(0, scale, d).astype(np.float32), 0.0


def build_graph(
    spec: InputSpec = DIGITS_SPEC,
    class_names: tuple[str, ...] = DIGITS_CLASS_NAMES,
    train_fingerprint: str | None = None,
    extra_metadata: dict[str, str] | None = None,
    selection_logit: bool = False,
    logit_shift: float = 0.0,
    random_weight_scale: float | None = None,
) -> bytes:
    """Serialised ONNX model bytes of the linear digits graph for ``spec``.

    Args:
        spec: the input spec recorded in the metadata and used for the weights' shape.
        class_names: ``K = 10`` names (the weights are for 10 digit classes).
        train_fingerprint: stored under ``META_TRAIN_DATA_FINGERPRINT`` when given; pass
            ``load_digits("train").fingerprint`` to make calibration on the train split refuse.
        extra_metadata: further ``metadata_props`` (string values).
        selection_logit: also output g's logit z as ``selection_logit`` ``[N]`` (issue 10's
            optional output; graphs without it are the older contract).
        logit_shift: added to g's bias; ``+20`` pushes most images' z past 17, where float32
            ``sigmoid(z)`` is exactly 1.0: a model whose g saturates, as SYNC's can.
        random_weight_scale: random weights of this scale (:func:`random_weights`) instead of the
            fitted ones, for big input specs where the ridge fit (a D x D solve) would take long.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(class_names) != 10:
        raise ValueError(f"class_names should hold 10 names, but got {len(class_names)}")
    if random_weight_scale is None:
        w, b, w_g, b_g = fitted_weights(spec)
    else:
        w, b, w_g, b_g = random_weights(spec, random_weight_scale)
    d = spec.channels * spec.height * spec.width
    inits = [
        numpy_helper.from_array(w.reshape(d, 10), "W"),
        numpy_helper.from_array(b.reshape(10), "b"),
        numpy_helper.from_array(w_g.reshape(d, 1), "W_g"),
        numpy_helper.from_array(np.array([b_g + logit_shift], dtype=np.float32), "b_g"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),  # [N, D]
        helper.make_node("MatMul", ["flat", "W"], ["xw"]),  # [N, 10]
        helper.make_node("Add", ["xw", "b"], [LOGITS_NAME]),  # [N, 10]
        helper.make_node("MatMul", ["flat", "W_g"], ["gw"]),  # [N, 1]
        helper.make_node("Add", ["gw", "b_g"], ["g_logit"]),  # [N, 1]
        helper.make_node("Sigmoid", ["g_logit"], ["g"]),  # [N, 1]
        helper.make_node("Reshape", ["g", "flat_shape"], [SELECTION_NAME]),  # [N]
    ]
    outputs = [
        helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["N", 10]),
        helper.make_tensor_value_info(SELECTION_NAME, TensorProto.FLOAT, ["N"]),
    ]
    if selection_logit:
        nodes.append(helper.make_node("Reshape", ["g_logit", "flat_shape"], [SELECTION_LOGIT_NAME]))
        outputs.append(helper.make_tensor_value_info(SELECTION_LOGIT_NAME, TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(
        nodes,
        "abstain_test_linear",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["N", spec.channels, spec.height, spec.width]
            )
        ],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="abstain-tests"
    )
    model.ir_version = IR_VERSION
    meta = {META_INPUT_SPEC: spec.to_json(), META_CLASS_NAMES: json.dumps(list(class_names))}
    if train_fingerprint is not None:
        meta[META_TRAIN_DATA_FINGERPRINT] = train_fingerprint
    meta.update(extra_metadata or {})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_graph(path: Path, **kwargs: object) -> Path:
    """Write :func:`build_graph` ``(**kwargs)`` to ``path``; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_graph(**kwargs))  # type: ignore[arg-type]
    return path


def triton_config(
    name: str, spec: InputSpec, num_classes: int = 10, max_batch_size: int = 64, selection_logit: bool = False
) -> str:
    """A minimal Triton ``config.pbtxt`` for the graph (dims exclude the batch dimension)."""
    logit = (
        (
            f',\n         {{ name: "{SELECTION_LOGIT_NAME}" data_type: TYPE_FP32 dims: [ 1 ] '
            "reshape: { shape: [ ] } }"
        )
        if selection_logit
        else ""
    )
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f'input [ {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 '
        f"dims: [ {spec.channels}, {spec.height}, {spec.width} ] }} ]\n"
        f'output [ {{ name: "{LOGITS_NAME}" data_type: TYPE_FP32 dims: [ {num_classes} ] }},\n'
        f'         {{ name: "{SELECTION_NAME}" data_type: TYPE_FP32 dims: [ 1 ] '
        "reshape: { shape: [ ] } }" + logit + " ]\n"
        "dynamic_batching { }\n"
    )


def write_model_dir(
    repository: Path,
    name: str = DEFAULT_MODEL_NAME,
    version: int = 1,
    spec: InputSpec = DIGITS_SPEC,
    class_names: tuple[str, ...] = DIGITS_CLASS_NAMES,
    train_fingerprint: str | None = None,
    selection_logit: bool = False,
    logit_shift: float = 0.0,
    random_weight_scale: float | None = None,
) -> Path:
    """A model-repository entry ``repository/name/{config.pbtxt, labels.txt, version/model.onnx}``.

    Returns the version directory (``repository/name/version``); no ``calibration.json``.
    """
    entry = Path(repository) / name
    version_dir = entry / str(version)
    write_graph(
        version_dir / MODEL_FILENAME,
        spec=spec,
        class_names=class_names,
        train_fingerprint=train_fingerprint,
        selection_logit=selection_logit,
        logit_shift=logit_shift,
        random_weight_scale=random_weight_scale,
    )
    (entry / LABELS_FILENAME).write_text("\n".join(class_names) + "\n")
    (entry / TRITON_CONFIG_FILENAME).write_text(
        triton_config(name, spec, len(class_names), selection_logit=selection_logit)
    )
    return version_dir
