"""A deep ensemble as one graph: the members' softmax averaged (Lakshminarayanan et al., NeurIPS 2017).

``abstain export CKPT1 CKPT2 … --name NAME`` writes one ONNX graph that follows the contract::

    logits          float32 [N, K]  log p̄,  p̄ = (1/M) Σ_m softmax(f_m(x))   (so softmax(logits) = p̄)
    selection       float32 [N]     max_k p̄_k, the ensemble's softmax response
    selection_logit float32 [N]     its logit, log(s / (1 − s)) = ℓ_max − logsumexp_{k≠max} ℓ_k

``log p̄`` is computed as ``logsumexp_m(log_softmax(f_m)) − log M``, which is exact where the
members' probabilities underflow. The selection is the softmax response because deep ensembles
are ranked by it in the selective-classification literature (and the members' g heads, when they
have one, are not averaged: a g is calibrated to its own body). ``selection_logit`` is the
softmax response's logit (:func:`abstain.training.model.softmax_response_logit`) rather than
absent: in float32 the softmax response is exactly 1.0 for the most confident inputs, and
calibration and serving threshold the logit when the graph has it (docs/export.md).

Members must agree on the input spec, class names and training data (its fingerprint, which
calibration uses to refuse the training split). The parity check runs the same images through
:class:`EnsembleNet` in PyTorch, as every export is checked (:mod:`abstain.export.verify`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abstain.contract import (
    META_CHECKPOINT_SHA256,
    META_CLASS_NAMES,
    META_CODE_VERSION,
    META_EXPORT,
    META_INPUT_SPEC,
    META_TRAIN_DATA_FINGERPRINT,
    META_TRAINING,
    InputSpec,
    class_names_json,
)
from abstain.export.onnx_export import (
    IR_VERSION,
    OPSET,
    check_graph,
    export_module,
    metadata_json,
    optimize_graph,
    set_metadata,
)
from abstain.export.verify import FP32_TOLERANCE, ParityReport, verification_inputs, verify_parity
from abstain.training.model import SelectiveNet, SelectiveOutput, softmax_response_logit
from abstain.version import code_version


class EnsembleNet(nn.Module):
    """M SelectiveNets → :class:`SelectiveOutput` of their averaged softmax (see the module).

    ``aux_logits`` repeats ``logits`` (an ensemble has no auxiliary head; nothing reads it).
    """

    def __init__(self, members: Sequence[SelectiveNet]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, but got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> SelectiveOutput:
        log_probs = torch.stack([torch.log_softmax(m(x).logits, dim=1) for m in self.members])  # [M, N, K]
        logits = torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # [N, K] log p̄
        selection_logit = softmax_response_logit(logits)  # [N]
        return SelectiveOutput(logits, torch.sigmoid(selection_logit), logits, selection_logit)


class _EnsembleGraph(nn.Module):
    """The exported wrapper: a tuple (logits, selection, selection_logit), as InferenceGraph's."""

    def __init__(self, ensemble: EnsembleNet) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.ensemble(pixels)
        assert out.selection_logit is not None  # EnsembleNet always sets it
        return out.logits, out.selection, out.selection_logit


def consistent_members(
    checkpoints: Sequence[dict[str, Any]], paths: Sequence[Path]
) -> tuple[InputSpec, list[str]]:
    """The members' common input spec and class names; ``ValueError`` naming the first member
    that differs from the first (spec, classes, training-data fingerprint)."""
    from abstain.export.pipeline import _consistent_spec

    spec, names = _consistent_spec(checkpoints[0], paths[0])
    fingerprint = checkpoints[0].get("data_fingerprint")
    for checkpoint, path in zip(checkpoints[1:], paths[1:], strict=True):
        other_spec, other_names = _consistent_spec(checkpoint, path)
        if other_spec != spec or other_names != names:
            raise ValueError(
                f"ensemble members should share the input spec and class names: {path} has "
                f"{list(other_spec.shape)} and {len(other_names)} classes, {paths[0]} has "
                f"{list(spec.shape)} and {len(names)}"
            )
        if checkpoint.get("data_fingerprint") != fingerprint:
            raise ValueError(
                f"ensemble members should be trained on the same data: {path}'s training-data "
                f"fingerprint differs from {paths[0]}'s, and calibration needs one to refuse it"
            )
    return spec, names


def ensemble_metadata(
    checkpoints: Sequence[dict[str, Any]],
    sha256s: Sequence[str],
    spec: InputSpec,
    names: list[str],
    optimize: bool,
) -> dict[str, str]:
    """The graph's ``metadata_props``: the contract's keys, with one entry per member where a single
    export has one value (training configurations, checkpoint hashes). No test metrics: the
    members' are their own, and the ensemble was not evaluated by training."""
    meta = {
        META_CLASS_NAMES: class_names_json(names),
        META_INPUT_SPEC: spec.to_json(),
        META_TRAINING: metadata_json(
            {
                "ensemble": {"members": len(checkpoints), "combine": "mean softmax"},
                "members": [c["train_config"] for c in checkpoints],
            }
        ),
        META_CHECKPOINT_SHA256: metadata_json(list(sha256s)),
        META_CODE_VERSION: code_version(),
        META_EXPORT: metadata_json(
            {
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "opset": OPSET,
                "ir_version": IR_VERSION,
                "precision": "fp32",
                "optimized": "onnxruntime basic" if optimize else None,
                "tolerance": FP32_TOLERANCE.__dict__,
                "ensemble_of": len(checkpoints),
                "training_code_versions": [c.get("code_version") for c in checkpoints],
            }
        ),
    }
    if checkpoints[0].get("data_fingerprint"):
        meta[META_TRAIN_DATA_FINGERPRINT] = str(checkpoints[0]["data_fingerprint"])
    return meta


def build_verified_ensemble(
    checkpoints: Sequence[dict[str, Any]],
    sha256s: Sequence[str],
    paths: Sequence[Path],
    optimize: bool = False,
) -> tuple[bytes, ParityReport]:
    """Export, annotate, check and verify the ensemble of ``checkpoints``; write nothing."""
    import onnx

    from abstain.training.checkpoint import model_from_checkpoint

    spec, names = consistent_members(checkpoints, paths)
    ensemble = EnsembleNet([model_from_checkpoint(c) for c in checkpoints]).eval()
    proto = export_module(_EnsembleGraph(ensemble).eval(), spec)
    if optimize:
        proto = onnx.load_from_string(optimize_graph(proto.SerializeToString()))
        proto.ir_version = IR_VERSION
    set_metadata(proto, ensemble_metadata(checkpoints, sha256s, spec, names, optimize))
    check_graph(proto, spec, len(names))
    model_bytes = proto.SerializeToString()
    x, source = verification_inputs(spec, checkpoints[0]["train_config"].get("dataset"))
    return model_bytes, verify_parity(ensemble, model_bytes, x, source, FP32_TOLERANCE)
