"""``abstain export`` end to end: checkpoint → checked, verified ONNX graph → repository entry.

Order matters for "a failed export leaves the repository as it was": everything that can
fail — reading the checkpoint, planning the entry, exporting, ``onnx.checker``, the parity
check — happens before the first byte is written; only then is the entry committed atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abstain.contract import (
    META_CHECKPOINT_SHA256,
    META_CLASS_NAMES,
    META_CODE_VERSION,
    META_EXPORT,
    META_INPUT_SPEC,
    META_SPLIT_METRICS,
    META_TEST_METRICS,
    META_TRAIN_DATA_FINGERPRINT,
    META_TRAINING,
    InputSpec,
    class_names_json,
)
from abstain.export.onnx_export import (
    IR_VERSION,
    OPSET,
    check_graph,
    export_graph,
    metadata_json,
    optimize_graph,
    set_metadata,
)
from abstain.export.repository import DEFAULT_MAX_BATCH_SIZE, commit_entry, plan_entry, render_triton_config
from abstain.export.verify import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ParityReport,
    verification_inputs,
    verify_parity,
)
from abstain.io import sha256_bytes, sha256_file
from abstain.version import code_version

_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matched PyTorch."""

    model_path: Path
    version: int
    sha256: str
    size_bytes: int
    parity: ParityReport
    replaced: bool
    metrics_key: str | None = None  # metadata key the checkpoint's metrics went under, if any
    notes: tuple[str, ...] = ()  # things the user should know (e.g. metrics that are not test metrics)


def _consistent_spec(checkpoint: dict[str, Any], path: Path) -> tuple[InputSpec, list[str]]:
    """The checkpoint's input spec and class names, checked against its model config."""
    from abstain.training.checkpoint import input_spec_from_checkpoint

    spec = input_spec_from_checkpoint(checkpoint)
    config = checkpoint["model_config"]
    class_names = [str(c) for c in checkpoint["class_names"]]
    if len(class_names) != int(config.get("num_classes", -1)):
        raise ValueError(
            f"{path}: class_names has {len(class_names)} entries but the model has "
            f"num_classes={config.get('num_classes')}"
        )
    size = int(config.get("image_size", -1))
    if (spec.channels, spec.height, spec.width) != (int(config.get("in_channels", -1)), size, size):
        raise ValueError(
            f"{path}: input_spec {list(spec.shape)} does not match the model's "
            f"in_channels={config.get('in_channels')} image_size={size}"
        )
    return spec, class_names


def metrics_metadata(checkpoint: dict[str, Any]) -> tuple[str | None, str | None]:
    """Where the checkpoint's ``metrics`` go in the graph's metadata, and a note for the user.

    Returns ``(key, note)``. Only a record with ``"split": "test"`` is stored as
    :data:`~abstain.contract.META_TEST_METRICS` (note ``None``). A checkpoint written by an
    interrupted run holds the last epoch's *validation* record instead: it is stored under
    ``abstain.val_metrics`` (the split's own name, :data:`META_SPLIT_METRICS`), with a note
    saying so. Metrics without a recognisable split are left out (key ``None``), with a note.
    """
    metrics = checkpoint.get("metrics")
    if metrics is None:
        return None, None
    split = metrics.get("split") if isinstance(metrics, dict) else None
    if split == "test":
        return META_TEST_METRICS, None
    if isinstance(split, str) and _SPLIT_NAME.fullmatch(split):
        key = META_SPLIT_METRICS.format(split=split)
        epoch = metrics.get("epoch", checkpoint.get("epoch"))
        return key, (
            f"the checkpoint holds no test metrics, only the {split} metrics of epoch {epoch} "
            f"(the run stopped before its test evaluation): stored as {key}, "
            f"not {META_TEST_METRICS}"
        )
    return None, (
        f"the checkpoint's metrics name no split (got split={split!r}), so they are not stored "
        f"in the graph; {META_TEST_METRICS} needs split 'test'"
    )


def graph_metadata(
    checkpoint: dict[str, Any],
    checkpoint_sha256: str,
    spec: InputSpec,
    class_names: list[str],
    fp16: bool,
    optimize: bool,
) -> dict[str, str]:
    """The graph's ``metadata_props`` (keys from :mod:`abstain.contract`, plus :data:`META_EXPORT`)."""
    import torch

    meta = {
        META_CLASS_NAMES: class_names_json(class_names),
        META_INPUT_SPEC: spec.to_json(),
        META_TRAINING: metadata_json(checkpoint["train_config"]),
        META_CHECKPOINT_SHA256: checkpoint_sha256,
        META_CODE_VERSION: code_version(),
        META_EXPORT: metadata_json(
            {
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "opset": OPSET,
                "ir_version": IR_VERSION,
                "precision": "fp16" if fp16 else "fp32",
                "optimized": "onnxruntime basic" if optimize else None,
                "tolerance": (FP16_TOLERANCE if fp16 else FP32_TOLERANCE).__dict__,
                "training_code_version": checkpoint.get("code_version"),
                "epoch": checkpoint.get("epoch"),
            }
        ),
    }
    if checkpoint.get("data_fingerprint"):
        meta[META_TRAIN_DATA_FINGERPRINT] = str(checkpoint["data_fingerprint"])
    metrics_key, _ = metrics_metadata(checkpoint)
    if metrics_key is not None:
        meta[metrics_key] = metadata_json(checkpoint["metrics"])
    return meta


def build_verified_graph(
    checkpoint: dict[str, Any],
    checkpoint_sha256: str,
    fp16: bool = False,
    optimize: bool = False,
    path: Path = Path("checkpoint"),
) -> tuple[bytes, ParityReport]:
    """Export, annotate, optionally optimise, check and verify one checkpoint; write nothing.

    Returns the serialised graph and its parity report; raises ``ValueError`` (``ParityError``)
    if the graph fails ``onnx.checker``, the contract's shapes, or the parity check.
    """
    import onnx

    from abstain.training.checkpoint import model_from_checkpoint

    spec, class_names = _consistent_spec(checkpoint, path)
    model = model_from_checkpoint(checkpoint)
    proto = export_graph(model, spec, fp16=fp16)
    metadata = graph_metadata(checkpoint, checkpoint_sha256, spec, class_names, fp16, optimize)
    if optimize:
        proto = onnx.load_from_string(optimize_graph(proto.SerializeToString()))
        proto.ir_version = IR_VERSION  # ORT saves with its own newest IR version
    set_metadata(proto, metadata)
    check_graph(proto, spec, len(class_names))
    model_bytes = proto.SerializeToString()
    x, source = verification_inputs(spec, checkpoint["train_config"].get("dataset"))
    report = verify_parity(model, model_bytes, x, source, FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    return model_bytes, report


def export_checkpoint(
    checkpoint_path: Path,
    name: str,
    repository: Path = Path("models"),
    version: int | None = None,
    force: bool = False,
    optimize: bool = False,
    fp16: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> ExportResult:
    """Export ``checkpoint_path`` to ``repository/name/<version>/model.onnx`` (+ config, labels).

    Raises (nothing written in every case): ``FileNotFoundError`` (no checkpoint),
    ``ValueError`` (corrupted or foreign checkpoint, bad name/version, mismatching entry,
    failed check or parity), ``FileExistsError`` (version exists, no ``force``),
    ``NotADirectoryError``/``PermissionError`` (repository not writable).
    """
    from abstain.training.checkpoint import load_checkpoint

    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    spec, class_names = _consistent_spec(checkpoint, checkpoint_path)
    config_text = render_triton_config(name, spec, len(class_names), max_batch_size)
    # plan first: a wrong name or a full version fails in milliseconds, not after the export
    plan = plan_entry(Path(repository), name, class_names, config_text, version=version, force=force)
    model_bytes, report = build_verified_graph(
        checkpoint, sha256_file(checkpoint_path), fp16=fp16, optimize=optimize, path=checkpoint_path
    )
    model_path = commit_entry(plan, model_bytes, config_text, class_names)
    metrics_key, note = metrics_metadata(checkpoint)
    return ExportResult(
        model_path,
        plan.version,
        sha256_bytes(model_bytes),
        len(model_bytes),
        report,
        plan.replace_version,
        metrics_key,
        (note,) if note else (),
    )


def describe(result: ExportResult) -> str:
    """A few human-readable lines about an export (what the CLI prints)."""
    p = result.parity
    return "\n".join(
        [
            f"wrote {result.model_path} (version {result.version}{', replaced' if result.replaced else ''}, "
            f"{result.size_bytes / 1e6:.2f} MB, sha256 {result.sha256})",
            f"parity vs PyTorch on {p.num_images} images ({p.inputs}) at batch sizes "
            f"{', '.join(map(str, p.batch_sizes))}: max |Δlogits| = {p.max_abs_logits:.2e}, "
            f"max |Δselection| = {p.max_abs_selection:.2e}, "
            f"max |Δselection_logit| = {p.max_abs_selection_logit:.2e} "
            f"(tolerance atol={p.tolerance.atol:g}, rtol={p.tolerance.rtol:g})",
            *(f"note: {note}" for note in result.notes),
        ]
    )


def report_json(result: ExportResult) -> str:
    """The result as JSON (``abstain export --json``)."""
    return json.dumps(
        {
            "model_path": str(result.model_path),
            "version": result.version,
            "sha256": result.sha256,
            "size_bytes": result.size_bytes,
            "replaced": result.replaced,
            "parity": result.parity.to_dict(),
            "metrics_key": result.metrics_key,
            "notes": list(result.notes),
        },
        indent=2,
    )


def export_ensemble(
    checkpoint_paths: list[Path],
    name: str,
    repository: Path = Path("models"),
    version: int | None = None,
    force: bool = False,
    optimize: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> ExportResult:
    """Export the deep ensemble of ``checkpoint_paths`` (≥ 2) as one graph (:mod:`abstain.export.ensemble`)
    to ``repository/name/<version>/model.onnx``; the same checks, parity and atomic commit as
    :func:`export_checkpoint`, and the same errors."""
    from abstain.export.ensemble import build_verified_ensemble, consistent_members
    from abstain.training.checkpoint import load_checkpoint

    paths = [Path(p) for p in checkpoint_paths]
    if len(paths) < 2:
        raise ValueError(f"an ensemble export needs at least 2 checkpoints, but got {len(paths)}")
    checkpoints = [load_checkpoint(p) for p in paths]
    spec, class_names = consistent_members(checkpoints, paths)
    config_text = render_triton_config(name, spec, len(class_names), max_batch_size)
    plan = plan_entry(Path(repository), name, class_names, config_text, version=version, force=force)
    model_bytes, report = build_verified_ensemble(
        checkpoints, [sha256_file(p) for p in paths], paths, optimize=optimize
    )
    model_path = commit_entry(plan, model_bytes, config_text, class_names)
    return ExportResult(
        model_path,
        plan.version,
        sha256_bytes(model_bytes),
        len(model_bytes),
        report,
        plan.replace_version,
        None,
        (
            f"an ensemble of {len(paths)} members (mean softmax; selection = its softmax response); "
            "no test metrics stored: calibrate and evaluate the entry",
        ),
    )
