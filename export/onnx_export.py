"""SelectiveNet → ONNX: the inference graph (prediction f and selection g; no auxiliary head h).

The graph follows ``abstain.contract`` (DESIGN.md, "The artifact contract")::

    pixels    float32 [N, C, H, W] raw pixels in [0, 1]   (normalisation is inside the graph)
    logits          float32 [N, K]  prediction head f
    selection       float32 [N]     selection head g in [0, 1]
    selection_logit float32 [N]     g's logit z (g = sigmoid(z)); optional in the contract,
                                    always exported here: float32 g is exactly 1.0 beyond
                                    z ≈ 17, and calibration thresholds z instead

N is a symbolic dimension ("batch"). SelectiveNet is Geifman & El-Yaniv, ICML 2019; the
auxiliary head h only shapes training (and SYNC's selective prior, Mishra et al. 2026) and
is left out of the served graph.

Exporter: the ``torch.export``-based ("dynamo") one, since the legacy TorchScript exporter is
deprecated (both gave correct graphs: docs/benchmarks.md, "Measurements behind design
choices"). Its lowest opset is 18; the graph is stamped IR version 8 (the IR
that introduced opset 18, ONNX 1.13) so that older ONNX Runtime builds, e.g. in older Triton
containers, still load it — ``onnx.checker`` and ONNX Runtime validate that stamp on every export.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from abstain.contract import INPUT_NAME, LOGITS_NAME, SELECTION_LOGIT_NAME, SELECTION_NAME, InputSpec

if TYPE_CHECKING:
    from abstain.training.model import SelectiveNet

#: ONNX operator set of the exported graph (the dynamo exporter's lowest; ORT >= 1.14 runs it).
OPSET = 18
#: IR version stamped on the graph: the lowest that allows opset 18 (see module docstring).
IR_VERSION = 8
#: The graph's outputs, in order: the contract's two and the optional selection_logit.
EXPORTED_OUTPUTS = (LOGITS_NAME, SELECTION_NAME, SELECTION_LOGIT_NAME)
#: Batch size of the example input used for tracing; not 0 or 1, which torch.export specialises.
_TRACE_BATCH = 2


class InferenceGraph(nn.Module):
    """What gets exported: ``pixels [N, C, H, W] → (logits [N, K], selection [N],
    selection_logit [N])``, all float32.

    With ``fp16=True`` the wrapped model must hold float16 weights: the input is cast to
    float16 *inside* the graph and both outputs back to float32, so the graph's interface
    (the contract) is the same at either precision.
    """

    def __init__(self, model: SelectiveNet, fp16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fp16 = fp16

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = pixels.half() if self.fp16 else pixels
        features = self.model.forward_features(x)  # [N, D]
        out = self.model.forward_heads(features)  # aux_logits is computed but is not an output,
        # so the exporter prunes head h away; forward_heads always sets selection_logit [N]
        if out.selection_logit is None:
            raise RuntimeError("forward_heads returned no selection_logit, which the graph exports")
        return out.logits.float(), out.selection.float(), out.selection_logit.float()


def export_graph(model: SelectiveNet, spec: InputSpec, fp16: bool = False) -> onnx.ModelProto:
    """Trace ``model`` (a SelectiveNet in eval mode) into an ONNX graph with a dynamic batch.

    Args:
        model: float32 SelectiveNet; it is not modified (fp16 export works on a copy).
        spec: the input spec; the example input is ``[2, C, H, W]`` uniform in [0, 1].
        fp16: export float16 weights and arithmetic behind float32 inputs/outputs.

    Returns:
        The graph, opset :data:`OPSET`, IR :data:`IR_VERSION`, weights embedded (no external data).
    """
    import copy

    body = copy.deepcopy(model).half() if fp16 else model
    return export_module(InferenceGraph(body.eval(), fp16=fp16).eval(), spec)


def export_module(wrapper: nn.Module, spec: InputSpec) -> onnx.ModelProto:
    """Trace ``wrapper`` (``pixels [N, C, H, W] → (logits [N, K], selection [N], selection_logit
    [N])``, eval mode) into the contract's graph: a dynamic batch, opset :data:`OPSET`, IR
    :data:`IR_VERSION`, weights embedded. :func:`export_graph` and the ensemble export use it."""
    example = torch.rand(_TRACE_BATCH, *spec.shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports progress on stdout/stderr and warns about its own internals; an
    # export failure still raises, with its own message.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=list(EXPORTED_OUTPUTS),
            dynamic_shapes={"pixels": {0: batch}},
            verbose=False,
        )
    if program is None:  # torch returns None only from the TorchScript exporter (dynamo=False)
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    proto.producer_name = "abstain"
    return proto


def set_metadata(proto: onnx.ModelProto, metadata: Mapping[str, str]) -> onnx.ModelProto:
    """Replace the graph's ``metadata_props`` with ``metadata`` (keys sorted, values strings)."""
    del proto.metadata_props[:]
    for key in sorted(metadata):
        value = metadata[key]
        if not isinstance(value, str):
            raise TypeError(f"metadata value for {key!r} should be a str, but got {type(value).__name__}")
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def check_graph(proto: onnx.ModelProto, spec: InputSpec, num_classes: int) -> None:
    """``onnx.checker`` (full, with shape inference) plus the contract's names and shapes.

    Raises ``ValueError`` naming the first thing that is wrong.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"exported graph fails onnx.checker: {exc}") from exc

    def dims(value_info: onnx.ValueInfoProto) -> list[Any]:
        shape = value_info.type.tensor_type.shape.dim
        return [d.dim_param or d.dim_value for d in shape]

    inputs = {v.name: v for v in proto.graph.input}
    outputs = {v.name: v for v in proto.graph.output}
    expected = {
        INPUT_NAME: [*spec.shape],
        LOGITS_NAME: [num_classes],
        SELECTION_NAME: [],
        SELECTION_LOGIT_NAME: [],
    }
    if list(inputs) != [INPUT_NAME] or tuple(outputs) != EXPORTED_OUTPUTS:
        raise ValueError(
            f"exported graph should have input [{INPUT_NAME!r}] and outputs {list(EXPORTED_OUTPUTS)}, "
            f"but has {list(inputs)} and {list(outputs)}"
        )
    for name, info in {**inputs, **outputs}.items():
        got = dims(info)
        if info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ValueError(f"graph tensor {name!r} should be float32")
        # first dimension: the symbolic batch; the rest: fixed per-image sizes
        if len(got) != 1 + len(expected[name]) or not isinstance(got[0], str) or got[1:] != expected[name]:
            raise ValueError(
                f"graph tensor {name!r} should have shape [batch, {', '.join(map(str, expected[name]))}] "
                f"with a symbolic batch, but has {got}"
            )


def optimize_graph(model_bytes: bytes) -> bytes:
    """ONNX Runtime's offline graph optimisation at the *basic* level; returns the new graph.

    Basic = constant folding, redundant-node elimination and the like; unlike the extended and
    layout levels it adds no provider-specific fused ops, so the optimised graph still runs on
    any ONNX Runtime (CPU, CUDA, Triton's backend). Metadata must be set again by the caller
    (ORT may drop it).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="abstain-optimize-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        return target.read_bytes()


def metadata_json(value: Any) -> str:
    """JSON for a metadata value: sorted keys, anything non-JSON (paths, tuples) as its str."""
    return json.dumps(value, sort_keys=True, default=str)
