"""``abstain import`` from PyTorch: TorchScript, ``torch.export`` or a torchvision classifier.

The module is exported to a plain ONNX classifier (one input, logits ``[N, K]``, dynamic batch)
with the same exporter settings as ``abstain export`` (:data:`abstain.export.onnx_export.OPSET`,
IR :data:`~abstain.export.onnx_export.IR_VERSION`), then wrapped by
:func:`abstain.export.importer.import_onnx`, which folds the normalisation in, adds the
softmax-response selection, checks parity and writes the entry. Weights come only from the
given local file: a torchvision model is built with ``weights=None`` and loads the state dict
from SOURCE (``torch.load(weights_only=True)``), so nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abstain.contract import read_labels
from abstain.export.importer import ImportResult, import_onnx
from abstain.export.onnx_export import IR_VERSION, OPSET
from abstain.io import sha256_file


def load_module(source: Path, torchvision: str | None, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier in eval mode and what it was loaded from (for the import metadata)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    if torchvision is not None:
        import torchvision.models as tvm

        if torchvision not in tvm.list_models():
            raise ValueError(
                f"--torchvision {torchvision!r} is not a torchvision classifier; e.g. resnet18, "
                "mobilenet_v3_small, efficientnet_b0"
            )
        model = tvm.get_model(torchvision, weights=None, num_classes=num_classes)  # never downloads
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"{source}: not a state_dict of torchvision's {torchvision} with "
                f"{num_classes} classes ({exc})"
            ) from exc
        return model.eval(), {"from": "torchvision", "architecture": torchvision}
    if source.suffix.lower() == ".pt2":
        try:
            program = torch.export.load(source)
        except Exception as exc:  # torch raises several types for a foreign file
            raise ValueError(f"{source}: not a torch.export program ({exc})") from exc
        return program.module(), {"from": "torch.export"}
    try:
        return torch.jit.load(source, map_location="cpu").eval(), {"from": "torchscript"}
    except Exception as exc:
        raise ValueError(
            f"{source}: not a TorchScript file (save one with torch.jit.save), a "
            f"torch.export .pt2, or a state_dict with --torchvision ARCH ({exc})"
        ) from exc


def to_onnx(module: nn.Module, shape: Sequence[int], path: Path) -> None:
    """Export ``module`` (input ``[N, *shape]``) to ``path``: one input ``x``, output ``logits``."""
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if isinstance(module, torch.jit.ScriptModule):
            # the torch.export-based exporter cannot trace TorchScript; the legacy one can
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
            return
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        )
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    path.write_bytes(proto.SerializeToString())


def import_torch(
    source: Path,
    name: str,
    labels_path: Path,
    repository: Path = Path("models"),
    *,
    torchvision: str | None = None,
    input_spec: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    probabilities: bool = False,
    version: int | None = None,
    force: bool = False,
) -> ImportResult:
    """Export a PyTorch classifier to ONNX and import it (see the module docstring)."""
    if input_spec is None:
        raise ValueError(
            "importing from PyTorch needs --input-spec C,H,W (a module has no fixed input shape)"
        )
    labels_path = Path(labels_path)
    if not labels_path.is_file():
        raise FileNotFoundError(f"--labels {labels_path}: no such file (one class name per line)")
    module, provenance = load_module(source, torchvision, len(read_labels(labels_path)))
    provenance.update(file=Path(source).name, sha256=sha256_file(source), torch=torch.__version__)
    with tempfile.TemporaryDirectory(prefix="abstain-import-") as tmp:
        graph = Path(tmp) / "classifier.onnx"
        to_onnx(module, input_spec, graph)
        result = import_onnx(
            graph,
            name,
            labels_path,
            repository,
            input_spec=input_spec,
            mean=mean,
            std=std,
            probabilities=probabilities,
            version=version,
            force=force,
            provenance={"pytorch": provenance},
            check=lambda wrapped: check_against_torch(module, wrapped, probabilities),
        )
    return result


def check_against_torch(module: nn.Module, wrapped: bytes, probabilities: bool, n: int = 8) -> float:
    """Max |Δlogits| of the wrapped graph (read as the service reads it) vs the PyTorch module
    on random pixels; ``ValueError`` beyond atol = rtol = 1e-4 (nothing is written then)."""
    import numpy as np

    from abstain.runtime import OnnxModel

    graph = OnnxModel(wrapped, prefer_cuda=False)
    spec = graph.input_spec
    x = np.random.default_rng(1).random((n, *spec.shape), dtype=np.float32)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        want = module(torch.from_numpy((x - mean) / std)).double().numpy()
    if probabilities:
        want = np.log(np.maximum(want, 1e-12))
    got = graph.run(x).logits
    diff = float(np.max(np.abs(got - want)))
    if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise ValueError(
            f"the imported graph differs from the PyTorch module by {diff:.3g} in logits "
            "(tolerance 1e-4); nothing was written"
        )
    return diff
