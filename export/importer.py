"""``abstain import``: any ONNX image classifier → a contract entry in the model repository.

A classifier someone already has (scikit-learn via skl2onnx, a torchvision network, a model
from a zoo) has no selection head. It is wrapped, inside the ONNX graph, so that it follows
``abstain.contract`` like an exported SelectiveNet::

    pixels    float32 [N, C, H, W] in [0, 1]
      → (pixels - mean) / std            per channel (normalisation folded into the graph)
      → flatten to [N, C·H·W]            only if the original input is rank 2 (e.g. scikit-learn)
      → the original graph (names prefixed ``src/``, its own opset kept)
      → logits   float32 [N, K]          the chosen output; log(max(p, 1e-12)) for probabilities
      → selection float32 [N]            max softmax(logits), the softmax response
                                         (Geifman & El-Yaniv, NeurIPS 2017)

For probabilities, softmax(log p) = p, so the softmax response is the classifier's own top
probability. The wrapped graph is checked against the original in ONNX Runtime on random
pixels before anything is written, its provenance is recorded under
``abstain.contract.META_IMPORT``, and the entry is written atomically
(:mod:`abstain.export.repository`). No torch is needed on this path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from abstain.contract import (
    INPUT_NAME,
    LOGITS_NAME,
    META_CLASS_NAMES,
    META_CODE_VERSION,
    META_IMPORT,
    META_INPUT_SPEC,
    SELECTION_NAME,
    InputSpec,
    class_names_json,
    read_labels,
)
from abstain.export.repository import DEFAULT_MAX_BATCH_SIZE, commit_entry, plan_entry, render_triton_config
from abstain.io import sha256_bytes
from abstain.version import code_version

PREFIX = "src/"
#: floor under probabilities before the log (a probability of exactly 0 → log 1e-12 ≈ -27.6)
PROB_FLOOR = 1e-12
#: wrapped vs original on random pixels: float32 arithmetic in a different order
ATOL, RTOL = 1e-5, 1e-4
#: images used by the parity check, at batch sizes 1 and all of them
PARITY_IMAGES = 32


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote and how close the wrapped graph is to the original."""

    model_path: Path
    version: int
    sha256: str
    max_abs_logits: float
    max_abs_selection: float
    source: dict[str, Any]


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param or (d.dim_value if d.dim_value else "?") for d in value_info.type.tensor_type.shape.dim
    ]


def _graph_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The one real input (initializers listed as inputs by old exporters are not)."""
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    if len(inputs) != 1:
        raise ValueError(
            f"an image classifier should have one input, but this graph has {[v.name for v in inputs]}"
        )
    return inputs[0]


def _pick_output(graph: onnx.GraphProto, name: str | None) -> onnx.ValueInfoProto:
    """``name``, or the only float tensor output of rank 2 ``[N, K]``."""
    outputs = {v.name: v for v in graph.output}
    if name is not None:
        if name not in outputs:
            raise ValueError(f"--logits {name!r}: the graph's outputs are {list(outputs)}")
        chosen = outputs[name]
    else:
        candidates = [
            v
            for v in graph.output
            if v.type.HasField("tensor_type")
            and v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
            and len(v.type.tensor_type.shape.dim) == 2
        ]
        if len(candidates) != 1:
            raise ValueError(
                f"cannot tell which output holds the class scores among {list(outputs)}; "
                "name it with --logits OUTPUT_NAME"
            )
        chosen = candidates[0]
    tensor = chosen.type.tensor_type if chosen.type.HasField("tensor_type") else None
    if (
        tensor is None
        or tensor.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE)
        or len(tensor.shape.dim) != 2
    ):
        raise ValueError(
            f"output {chosen.name!r} should be a float tensor [N, K] of class scores; "
            "for a scikit-learn model convert it with options={'zipmap': False}"
        )
    return chosen


def infer_input_spec(
    original: onnx.ValueInfoProto,
    input_spec: Sequence[int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> InputSpec:
    """The wrapped graph's spec: ``--input-spec C,H,W`` or the original's static NCHW shape."""
    dims = _dims(original)
    if input_spec is None:
        if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
            raise ValueError(
                f"input {original.name!r} has shape {dims}; give --input-spec C,H,W "
                "(the image the classifier sees)"
            )
        c, h, w = (int(d) for d in dims[1:])
    else:
        if len(input_spec) != 3:
            raise ValueError(f"--input-spec should be C,H,W, but got {list(input_spec)}")
        c, h, w = (int(v) for v in input_spec)
    mean_t = tuple(float(v) for v in (mean or [0.0]))
    std_t = tuple(float(v) for v in (std or [1.0]))
    if len(mean_t) == 1:
        mean_t *= c
    if len(std_t) == 1:
        std_t *= c
    spec = InputSpec(channels=c, height=h, width=w, mean=mean_t, std=std_t)
    flat = c * h * w
    if len(dims) == 2 and isinstance(dims[1], int) and dims[1] != flat:
        raise ValueError(
            f"input {original.name!r} takes {dims[1]} features per row, but "
            f"--input-spec {c},{h},{w} gives {flat}"
        )
    if len(dims) == 4 and all(isinstance(d, int) for d in dims[1:]) and tuple(dims[1:]) != (c, h, w):
        raise ValueError(f"input {original.name!r} has shape {dims}, not [N, {c}, {h}, {w}]")
    if len(dims) not in (2, 4):
        raise ValueError(
            f"input {original.name!r} should be [N, C, H, W] or [N, features], but has shape {dims}"
        )
    return spec


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def wrap_graph(
    model: onnx.ModelProto,
    spec: InputSpec,
    class_names: Sequence[str],
    logits_output: str | None = None,
    probabilities: bool = False,
) -> onnx.ModelProto:
    """The contract graph around ``model`` (see the module docstring); metadata not yet set."""
    original_input = _graph_input(model.graph)
    scores = _pick_output(model.graph, logits_output)
    rank = len(original_input.type.tensor_type.shape.dim)
    in_type = original_input.type.tensor_type.elem_type
    k = len(class_names)
    k_dim = scores.type.tensor_type.shape.dim[1].dim_value
    if k_dim and k_dim != k:
        raise ValueError(f"output {scores.name!r} has {k_dim} classes but the labels file names {k}")
    src = onnx.compose.add_prefix(model, PREFIX)  # no name clash with the wrapper's tensors
    opset = _opset(model)
    c = spec.channels
    consts = [
        numpy_helper.from_array(np.asarray(spec.mean, np.float32).reshape(1, c, 1, 1), "wrap/mean"),
        numpy_helper.from_array(np.asarray(spec.std, np.float32).reshape(1, c, 1, 1), "wrap/std"),
    ]
    pre = [
        helper.make_node("Sub", [INPUT_NAME, "wrap/mean"], ["wrap/centred"]),
        helper.make_node("Div", ["wrap/centred", "wrap/std"], ["wrap/normalised"]),
    ]
    x = "wrap/normalised"
    if rank == 2:
        pre.append(helper.make_node("Flatten", [x], ["wrap/flat"], axis=1))
        x = "wrap/flat"
    if in_type != TensorProto.FLOAT:
        pre.append(helper.make_node("Cast", [x], ["wrap/cast_in"], to=in_type))
        x = "wrap/cast_in"
    pre.append(helper.make_node("Identity", [x], [PREFIX + original_input.name]))
    post = []
    y = PREFIX + scores.name
    if scores.type.tensor_type.elem_type != TensorProto.FLOAT:
        post.append(helper.make_node("Cast", [y], ["wrap/scores32"], to=TensorProto.FLOAT))
        y = "wrap/scores32"
    if probabilities:
        consts.append(numpy_helper.from_array(np.asarray([PROB_FLOOR], np.float32), "wrap/floor"))
        post += [
            helper.make_node("Max", [y, "wrap/floor"], ["wrap/floored"]),
            helper.make_node("Log", ["wrap/floored"], ["wrap/log_p"]),
        ]
        y = "wrap/log_p"
    post += [
        helper.make_node("Identity", [y], [LOGITS_NAME]),
        helper.make_node("Softmax", [LOGITS_NAME], ["wrap/probs"], axis=1),
    ]
    if opset >= 18:  # ReduceMax took its axes as an attribute before opset 18
        consts.append(numpy_helper.from_array(np.asarray([1], np.int64), "wrap/axis"))
        post.append(helper.make_node("ReduceMax", ["wrap/probs", "wrap/axis"], [SELECTION_NAME], keepdims=0))
    else:
        post.append(helper.make_node("ReduceMax", ["wrap/probs"], [SELECTION_NAME], axes=[1], keepdims=0))
    graph = helper.make_graph(
        [*pre, *src.graph.node, *post],
        "abstain_import",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *spec.shape])],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info(SELECTION_NAME, TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[*consts, *src.graph.initializer],
        sparse_initializer=list(src.graph.sparse_initializer),
    )
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="abstain import")
    wrapped.ir_version = model.ir_version
    wrapped.functions.extend(src.functions)
    return wrapped


def parity(
    original: bytes,
    wrapped: bytes,
    spec: InputSpec,
    input_name: str,
    output_name: str,
    probabilities: bool,
    seed: int = 0,
) -> tuple[float, float]:
    """Max |Δlogits| and |Δselection| between the graphs on random pixels (batch 1 and all).

    The reference is computed from the original graph in numpy: normalise, reshape as the
    original wants, run, log if probabilities, softmax response. Raises ``ValueError`` beyond
    ``ATOL + RTOL·|reference|``.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    ref_sess = ort.InferenceSession(original, providers=providers)
    new_sess = ort.InferenceSession(wrapped, providers=providers)
    rng = np.random.default_rng(seed)
    x = rng.random((PARITY_IMAGES, *spec.shape), dtype=np.float32)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    ref_in = (x - mean) / std
    info = ref_sess.get_inputs()[0]
    if len(info.shape) == 2:
        ref_in = ref_in.reshape(len(x), -1)
    if info.type == "tensor(double)":
        ref_in = ref_in.astype(np.float64)
    worst_l = worst_s = 0.0
    for batch in (1, PARITY_IMAGES):
        for start in range(0, PARITY_IMAGES if batch == PARITY_IMAGES else 4, batch):
            sl = slice(start, start + batch)
            ref = np.asarray(ref_sess.run([output_name], {input_name: ref_in[sl]})[0], np.float64)
            if probabilities:
                ref = np.log(np.maximum(ref, PROB_FLOOR))
            z = np.exp(ref - ref.max(axis=1, keepdims=True))
            ref_sel = (z / z.sum(axis=1, keepdims=True)).max(axis=1)
            logits, selection = new_sess.run([LOGITS_NAME, SELECTION_NAME], {INPUT_NAME: x[sl]})
            for got, want, label in ((logits, ref, "logits"), (selection, ref_sel, "selection")):
                if got.shape != want.shape or not np.allclose(got, want, atol=ATOL, rtol=RTOL):
                    diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
                    raise ValueError(
                        f"the wrapped graph's {label} differ from the original's by "
                        f"{diff:.3g} at batch size {batch} (tolerance atol={ATOL}, rtol={RTOL})"
                    )
            worst_l = max(worst_l, float(np.max(np.abs(logits - ref))))
            worst_s = max(worst_s, float(np.max(np.abs(selection - ref_sel))))
    return worst_l, worst_s


def import_onnx(
    graph_path: Path,
    name: str,
    labels_path: Path,
    repository: Path = Path("models"),
    *,
    input_spec: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    logits_output: str | None = None,
    probabilities: bool = False,
    version: int | None = None,
    force: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    provenance: dict[str, Any] | None = None,
    check: Callable[[bytes], None] | None = None,
) -> ImportResult:
    """Wrap ``graph_path``, check it, and commit ``repository/name/<version>`` atomically.

    ``provenance`` adds to what :data:`abstain.contract.META_IMPORT` records (the PyTorch
    importers say what they exported from); ``check(wrapped_bytes)`` is a further check run
    before anything is written (the PyTorch importers compare with the module).
    """
    graph_path, labels_path = Path(graph_path), Path(labels_path)
    if not graph_path.is_file():
        raise FileNotFoundError(f"{graph_path}: no such ONNX file")
    if not labels_path.is_file():
        raise FileNotFoundError(f"--labels {labels_path}: no such file (one class name per line)")
    class_names = read_labels(labels_path)
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise ValueError(f"--labels {labels_path}: should name at least 2 distinct classes, one per line")
    data = graph_path.read_bytes()
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError
        raise ValueError(f"{graph_path} is not a valid ONNX model: {exc}") from exc
    original_input = _graph_input(model.graph)
    spec = infer_input_spec(original_input, input_spec, mean, std)
    scores = _pick_output(model.graph, logits_output)
    wrapped = wrap_graph(model, spec, class_names, scores.name, probabilities)
    source = {
        "file": graph_path.name,
        "sha256": sha256_bytes(data),
        "input": original_input.name,
        "input_shape": _dims(original_input),
        "scores_output": scores.name,
        "probabilities": bool(probabilities),
        "opset": _opset(model),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "selection": "softmax_response (computed in the graph)",
        **(provenance or {}),
    }
    meta = {
        META_INPUT_SPEC: spec.to_json(),
        META_CLASS_NAMES: class_names_json(class_names),
        META_CODE_VERSION: code_version(),
        META_IMPORT: json.dumps(source, sort_keys=True),
    }
    for key in sorted(meta):
        entry = wrapped.metadata_props.add()
        entry.key, entry.value = key, meta[key]
    try:
        onnx.checker.check_model(wrapped, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"the wrapped graph fails onnx.checker: {exc}") from exc
    wrapped_bytes = wrapped.SerializeToString()
    config = render_triton_config(name, spec, len(class_names), max_batch_size)
    plan = plan_entry(Path(repository), name, class_names, config, version=version, force=force)
    max_l, max_s = parity(data, wrapped_bytes, spec, original_input.name, scores.name, probabilities)
    if check is not None:
        check(wrapped_bytes)
    model_path = commit_entry(plan, wrapped_bytes, config, class_names)
    return ImportResult(model_path, plan.version, sha256_bytes(wrapped_bytes), max_l, max_s, source)


def describe(result: ImportResult) -> str:
    """What the CLI prints."""
    return (
        f"wrote {result.model_path} (version {result.version}, sha256 {result.sha256})\n"
        f"parity vs the original on {PARITY_IMAGES} random images: max |Δlogits| = "
        f"{result.max_abs_logits:.2e}, max |Δselection| = {result.max_abs_selection:.2e} "
        f"(tolerance atol={ATOL:g}, rtol={RTOL:g})\n"
        f"next: abstain calibrate {result.model_path.parent.parent} --data VAL.npz (or --dataset ...)"
    )
