"""``abstain import``: put a classifier this project did not train behind the same front door.

Any ONNX image classifier whose output is logits (or probabilities) becomes a model-repository
entry that follows the contract (:mod:`abstain.contract`)::

    pixels    float32 [N, C, H, W] in [0, 1]   → (pixels - mean) / std, reshaped to the
                                                 original input (flattened for [N, D] models)
    logits    float32 [N, K]                   the original output (log of it for probabilities)
    selection float32 [N]                      the softmax response max_k softmax(logits)_k

Such a model has no selection head, so its selection score is the softmax response (Geifman &
El-Yaniv, NeurIPS 2017, "Selective Classification for Deep Neural Networks"), computed inside
the graph: ``calibrate``, ``evaluate``, ``predict`` and ``serve`` then work on it unchanged, and
its operating points compare directly with a SYNC model's.

The wrapping is graph surgery with ``onnx.compose`` (the original's names get a prefix, so they
cannot collide with ours), checked by ``onnx.checker`` and by running both graphs in ONNX Runtime
on the same random inputs before anything is written; the entry is written atomically by
:mod:`abstain.export.repository`. PyTorch models (TorchScript, ``torch.export``, a torchvision
classifier with a local weights file) are first exported to ONNX by ``torch.onnx.export`` and
then wrapped the same way (:func:`torch_to_onnx`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
from onnx import TensorProto, helper

from abstain.contract import (
    INPUT_NAME,
    LOGITS_NAME,
    META_CLASS_NAMES,
    META_CODE_VERSION,
    META_IMPORTED,
    META_INPUT_SPEC,
    SELECTION_NAME,
    InputSpec,
    class_names_json,
)
from abstain.export.repository import DEFAULT_MAX_BATCH_SIZE, commit_entry, plan_entry, render_triton_config
from abstain.io import sha256_bytes
from abstain.version import code_version

#: Prefix given to every name of the imported graph (values, nodes, initializers).
PREFIX = "imported/"
#: Probabilities are clipped to this before the log, so a 0 gives a finite logit.
MIN_PROBABILITY = 1e-12
#: The wrapped graph must match the original this closely (float32 arithmetic, same kernels).
ATOL, RTOL = 1e-5, 1e-4
#: Opset of the nodes we add; the original's default-domain opset is raised to it if lower.
WRAP_OPSET = 13


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_onnx` wrote and how well the wrapper matched the original."""

    model_path: Path
    version: int
    sha256: str
    num_classes: int
    max_abs_diff: float
    replaced: bool


def parse_input_spec(
    text: str | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    graph_dims: Sequence[int | None],
) -> InputSpec:
    """``"C,H,W"`` (or the original input's dims when it is ``[N, C, H, W]``) + mean/std → spec."""
    fixed_dims = [d for d in graph_dims[1:] if isinstance(d, int) and d > 0]  # the known C, H, W
    if text:
        try:
            c, h, w = (int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(
                f"--input-spec should be C,H,W (three positive integers), but got {text!r}"
            ) from None
    elif len(graph_dims) == 4 and len(fixed_dims) == 3:
        c, h, w = (int(d) for d in fixed_dims)
    else:
        raise ValueError(
            f"the graph's input has shape {list(graph_dims)}, not [N, C, H, W] with fixed C, H, W: "
            "give --input-spec C,H,W (the image the flattened input comes from)"
        )
    mean = tuple(float(m) for m in (mean or [0.0] * c))
    std = tuple(float(s) for s in (std or [1.0] * c))
    if len(mean) == 1 and c > 1:
        mean = mean * c
    if len(std) == 1 and c > 1:
        std = std * c
    return InputSpec(channels=c, height=h, width=w, mean=mean, std=std)


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def wrap_graph(
    original: onnx.ModelProto, spec: InputSpec, logits_output: str | None, probabilities: bool
) -> onnx.ModelProto:
    """The original graph between our preprocessing and our two outputs (see the module docstring).

    Raises ``ValueError`` when the graph has not exactly one float input, the named output does
    not exist, or the input cannot take a ``spec`` image.
    """
    graph = original.graph
    initializer_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(inputs) != 1:
        raise ValueError(
            f"the graph should have one input (an image batch), but has {[i.name for i in inputs]}"
        )
    (source_input,) = inputs
    if source_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(
            f"the graph's input {source_input.name!r} should be float32, but is "
            f"{TensorProto.DataType.Name(source_input.type.tensor_type.elem_type)}"
        )
    outputs = [o.name for o in graph.output]
    chosen = logits_output or outputs[0]
    if chosen not in outputs:
        raise ValueError(f"--logits {chosen!r} is not an output of the graph; its outputs are {outputs}")
    in_dims = _dims(source_input)
    flat = spec.channels * spec.height * spec.width
    if len(in_dims) == 2:
        if in_dims[1] not in (None, flat):
            raise ValueError(
                f"the graph takes [N, {in_dims[1]}] features, but --input-spec "
                f"{spec.shape} flattens to {flat}"
            )
    elif len(in_dims) != 4 or any(d not in (None, s) for d, s in zip(in_dims[1:], spec.shape, strict=True)):
        raise ValueError(f"the graph's input {in_dims} does not take images of shape {list(spec.shape)}")

    prefixed = onnx.compose.add_prefix(original, PREFIX)
    g = prefixed.graph
    src_in, src_out = PREFIX + source_input.name, PREFIX + chosen
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "abstain/mean"], ["abstain/centred"]),
        helper.make_node(
            "Div", ["abstain/centred", "abstain/std"], ["abstain/normalised" if len(in_dims) == 2 else src_in]
        ),
    ]
    if len(in_dims) == 2:
        nodes.append(helper.make_node("Flatten", ["abstain/normalised"], [src_in], axis=1))
    post = []
    if probabilities:
        post += [
            helper.make_node("Clip", [src_out, "abstain/min_probability", ""], ["abstain/clipped"]),
            helper.make_node("Log", ["abstain/clipped"], [LOGITS_NAME]),
        ]
    else:
        post.append(helper.make_node("Identity", [src_out], [LOGITS_NAME]))
    # our nodes need opset >= 13 (Softmax over one axis); from opset 18 ReduceMax takes its
    # axes as an input instead of an attribute
    opsets = {o.domain: o.version for o in original.opset_import}
    opset = max(opsets.pop("ai.onnx", opsets.get("", WRAP_OPSET)), opsets.get("", WRAP_OPSET), WRAP_OPSET)
    opsets[""] = opset
    initializers = [
        helper.make_tensor("abstain/mean", TensorProto.FLOAT, mean.shape, mean.ravel()),
        helper.make_tensor("abstain/std", TensorProto.FLOAT, std.shape, std.ravel()),
        helper.make_tensor("abstain/min_probability", TensorProto.FLOAT, [], [MIN_PROBABILITY]),
    ]
    post.append(helper.make_node("Softmax", [LOGITS_NAME], ["abstain/probs"], axis=1))
    if opset >= 18:
        initializers.append(helper.make_tensor("abstain/axes", TensorProto.INT64, [1], [1]))
        post.append(
            helper.make_node("ReduceMax", ["abstain/probs", "abstain/axes"], [SELECTION_NAME], keepdims=0)
        )
    else:
        post.append(helper.make_node("ReduceMax", ["abstain/probs"], [SELECTION_NAME], axes=[1], keepdims=0))
    new_graph = helper.make_graph(
        nodes + list(g.node) + post,
        "abstain-imported",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *spec.shape])],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info(SELECTION_NAME, TensorProto.FLOAT, ["batch"]),
        ],
        initializer=list(g.initializer) + initializers,
        value_info=list(g.value_info),
    )
    new_graph.sparse_initializer.extend(g.sparse_initializer)
    model = helper.make_model(
        new_graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        producer_name="abstain import",
    )
    model.ir_version = max(original.ir_version, 8)
    model.functions.extend(prefixed.functions)
    onnx.checker.check_model(model)
    return model


def check_against_original(
    original: bytes,
    wrapped: bytes,
    spec: InputSpec,
    source_input_dims: list[int | None],
    logits_output: str,
    probabilities: bool,
    n: int = 16,
    seed: int = 0,
) -> float:
    """Max |Δ| of the wrapped graph's logits (or softmax, for probabilities) vs the original on random pixels.

    Raises ``ValueError`` when they differ by more than ``ATOL + RTOL·|x|``.
    """
    import onnxruntime as ort

    x = np.random.default_rng(seed).random((n, *spec.shape), dtype=np.float32)
    normalised = (x - np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)) / np.asarray(
        spec.std, np.float32
    ).reshape(1, -1, 1, 1)
    if len(source_input_dims) == 2:
        normalised = normalised.reshape(n, -1)
    ref_session = ort.InferenceSession(original, providers=["CPUExecutionProvider"])
    (ref,) = ref_session.run([logits_output], {ref_session.get_inputs()[0].name: normalised})
    session = ort.InferenceSession(wrapped, providers=["CPUExecutionProvider"])
    logits, selection = session.run([LOGITS_NAME, SELECTION_NAME], {INPUT_NAME: x})
    got = np.exp(logits) if probabilities else logits
    ref = np.asarray(ref, dtype=np.float32)
    if got.shape != ref.shape or selection.shape != (n,):
        raise ValueError(
            f"the wrapped graph gives logits {list(got.shape)} and selection "
            f"{list(selection.shape)}; expected {list(ref.shape)} and [{n}]"
        )
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    diff = float(np.max(np.abs(got - ref)))
    same_selection = np.allclose(selection, probs.max(axis=1), atol=1e-6)
    if not np.allclose(got, ref, atol=ATOL, rtol=RTOL) or not same_selection:
        raise ValueError(
            f"the wrapped graph does not match the original (max |Δ| = {diff:.3g}); nothing was written"
        )
    return diff


def read_label_file(path: Path) -> list[str]:
    """One class name per line (blank lines at the end ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file (one class name per line)")
    names = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if not names or any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: labels should be distinct, non-empty class names, one per line")
    return names


def import_onnx(
    graph: Path | bytes,
    name: str,
    labels: Sequence[str],
    repository: Path = Path("models"),
    *,
    input_spec: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    logits_output: str | None = None,
    probabilities: bool = False,
    version: int | None = None,
    force: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    source: dict[str, Any] | None = None,
) -> ImportResult:
    """Wrap an ONNX classifier into ``repository/name/<version>/`` (model.onnx, config, labels).

    Args:
        graph: the ONNX file (or its bytes).
        labels: the ``K`` class names, in the order of the output's columns.
        input_spec: ``"C,H,W"``; needed unless the graph's input is ``[N, C, H, W]``.
        mean, std: per-channel normalisation the classifier expects (folded into the graph).
        logits_output: which output holds the scores (default: the first).
        probabilities: the output is probabilities, not logits (its log becomes ``logits``).
        source: extra facts for the metadata (what the ONNX graph was made from).

    Raises (nothing written in every case): ``FileNotFoundError``, ``ValueError`` (not a
    classifier graph, a bad spec or labels, or a wrapper that does not match the original),
    ``FileExistsError`` (version exists, no ``force``).
    """
    if isinstance(graph, (bytes, bytearray)):
        original_bytes, origin = bytes(graph), "<bytes>"
    else:
        if not Path(graph).is_file():
            raise FileNotFoundError(f"{graph}: no such ONNX file")
        original_bytes, origin = Path(graph).read_bytes(), str(graph)
    try:
        original = onnx.load_from_string(original_bytes)
        onnx.checker.check_model(original)
    except Exception as exc:  # DecodeError, ValidationError: either way not a usable graph
        raise ValueError(f"{origin} is not a valid ONNX graph: {exc}") from exc
    initializer_names = {i.name for i in original.graph.initializer}
    inputs = [i for i in original.graph.input if i.name not in initializer_names]
    in_dims = _dims(inputs[0]) if len(inputs) == 1 else []
    spec = parse_input_spec(input_spec, mean, std, in_dims)
    chosen = logits_output or original.graph.output[0].name
    wrapped = wrap_graph(original, spec, chosen, probabilities)
    k = _output_classes(wrapped, spec)
    if k != len(labels):
        raise ValueError(f"the graph scores {k} classes but {len(labels)} labels were given")
    metadata = {
        META_CLASS_NAMES: class_names_json(list(labels)),
        META_INPUT_SPEC: spec.to_json(),
        META_CODE_VERSION: code_version(),
        META_IMPORTED: json.dumps(
            {
                "source": origin,
                "sha256": sha256_bytes(original_bytes),
                "logits_output": chosen,
                "probabilities": probabilities,
                "producer": original.producer_name or None,
                "opset": {o.domain or "ai.onnx": o.version for o in original.opset_import},
                "selection": "softmax response (no selection head)",
                **(source or {}),
            },
            sort_keys=True,
        ),
    }
    for key, value in sorted(metadata.items()):
        entry = wrapped.metadata_props.add()
        entry.key, entry.value = key, value
    model_bytes = wrapped.SerializeToString()
    diff = check_against_original(original_bytes, model_bytes, spec, in_dims, chosen, probabilities)
    config_text = render_triton_config(name, spec, k, max_batch_size)
    plan = plan_entry(Path(repository), name, list(labels), config_text, version=version, force=force)
    model_path = commit_entry(plan, model_bytes, config_text, list(labels))
    return ImportResult(model_path, plan.version, sha256_bytes(model_bytes), k, diff, plan.replace_version)


def _output_classes(model: onnx.ModelProto, spec: InputSpec) -> int:
    """K, from one run of the wrapped graph on a black image (shapes may be symbolic)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: np.zeros((1, *spec.shape), np.float32)})
    return int(logits.shape[1])


def torch_to_onnx(
    model_file: Path | None,
    spec: InputSpec,
    *,
    torchvision_name: str | None = None,
    weights: Path | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """A PyTorch classifier → ONNX bytes (input ``[N, C, H, W]`` normalised, output logits).

    One of: ``model_file`` (TorchScript, or a ``torch.export`` ``.pt2`` program) or
    ``torchvision_name`` with a local ``weights`` state dict (never downloaded). Needs the
    ``train`` extra. The normalisation is *not* in this graph: :func:`import_onnx` folds it in.
    """
    import torch

    if (model_file is None) == (torchvision_name is None):
        raise ValueError("give a TorchScript / torch.export file, or --torchvision NAME with --weights")
    if torchvision_name is not None:
        import torchvision

        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(
                f"--weights {weights}: a local state-dict file is needed for --torchvision "
                f"{torchvision_name} (nothing is downloaded)"
            )
        try:
            builder = torchvision.models.get_model_builder(torchvision_name)
        except ValueError as exc:
            raise ValueError(f"--torchvision {torchvision_name!r}: {exc}") from None
        state = torch.load(weights, map_location="cpu", weights_only=True)
        head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
        module = builder(weights=None, num_classes=int(head[-1].shape[0]) if head else 1000)
        module.load_state_dict(state)
        info = {"format": "torchvision", "torchvision_model": torchvision_name, "weights": str(weights)}
    else:
        if model_file is None:  # excluded by the check above; this narrows its type
            raise ValueError("give a TorchScript / torch.export file, or --torchvision NAME with --weights")
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file")
        if path.suffix == ".pt2":
            module = torch.export.load(str(path))  # an ExportedProgram: exported as it is
            info = {"format": "torch.export", "file": str(path)}
        else:
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                raise ValueError(
                    f"{path}: neither TorchScript nor a torch.export .pt2 file ({exc})"
                ) from None
            info = {"format": "torchscript", "file": str(path)}
    if isinstance(module, torch.nn.Module):
        module.eval()
    example = torch.rand(2, *spec.shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if info["format"] == "torchscript":  # the dynamo exporter does not take ScriptModules
            buffer = io.BytesIO()
            # cast: torch types f as a path, but its TorchScript exporter also writes to a file object
            torch.onnx.export(
                module,
                (example,),
                cast(Any, buffer),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}},
                opset_version=17,
            )
            return buffer.getvalue(), info
        if isinstance(module, torch.export.ExportedProgram):  # its dynamic shapes are its own
            program = torch.onnx.export(
                module, dynamo=True, input_names=["input"], output_names=["output"], external_data=False
            )
        else:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: batch},),
                external_data=False,
            )
    if program is None:  # torch returns None only from the TorchScript exporter (dynamo=False)
        raise RuntimeError(f"torch.onnx.export returned no ONNX program for {info['format']} model")
    return program.model_proto.SerializeToString(), info
