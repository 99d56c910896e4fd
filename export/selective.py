"""``abstain export-selective``: a calibrated version → a predict-or-abstain graph in the repository.

``models/<name>/<v>/{model.onnx, calibration.json}`` becomes ``models/<name>-selective/<v>/model.onnx``
(+ ``config.pbtxt``, ``labels.txt``): the base graph with every operating point of the
calibration baked in (:mod:`abstain.export.selective_graph`), so any ONNX runtime — Triton
included — returns the service's decision without the Python front door.

Deterministic: the same base graph and calibration give byte-identical files (no time stamps,
no code version in the graph), so the shipped ``models/digits-selective`` can be checked
against a fresh run. Verified before writing (``onnx.checker``, ONNX Runtime against the
numpy decision of ``abstain.selective``); written with :func:`abstain.export.repository.commit_entry`
(all or nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from abstain.contract import (
    ACCEPT_NAME,
    CALIBRATION_FILENAME,
    CLASS_INDEX_NAME,
    CONFIDENCE_NAME,
    INPUT_NAME,
    LABELS_FILENAME,
    LOGITS_NAME,
    META_CLASS_NAMES,
    META_INPUT_SPEC,
    META_SELECTIVE,
    MODEL_FILENAME,
    SCORE_SELECTION,
    SCORES_NAME,
    SELECTION_NAME,
    SELECTIVE_SUFFIX,
    InputSpec,
    resolve_version_dir,
    validate_model_name,
)
from abstain.export.repository import DEFAULT_MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, commit_entry, plan_entry
from abstain.export.selective_graph import append_decision
from abstain.io import sha256_bytes
from abstain.operating_points import Calibration, calibration_from_dict, verify_graph
from abstain.selective import selection_scores

#: Operating-point fields copied into the graph's metadata (what a client needs to read ``accept``).
POINT_FIELDS = (
    "name",
    "method",
    "score",
    "threshold",
    "target_coverage",
    "target_risk",
    "delta",
    "coverage",
    "risk",
)


@dataclass(frozen=True)
class SelectiveResult:
    model_path: Path
    name: str
    version: int
    base_sha256: str
    calibration_sha256: str
    operating_points: list[str]


def selective_metadata(calibration: Calibration, base_sha256: str, calibration_sha256: str) -> dict[str, Any]:
    """The ``abstain.selective`` metadata: operating points in ``accept``-column order + provenance."""
    return {
        # exact: bit-identical to the service's decision (see abstain.export.selective_graph)
        "operating_points": [
            {**{k: p.to_dict().get(k) for k in POINT_FIELDS}, "exact": p.score == SCORE_SELECTION}
            for p in calibration.operating_points
        ],
        "default_operating_point": calibration.default_operating_point,
        "base_graph_sha256": base_sha256,
        "calibration_sha256": calibration_sha256,
        "rule": "accept[:, j] = scores[:, j] >= threshold_j, scores in float64 (as serving/decisions.py)",
        "outputs": [CLASS_INDEX_NAME, CONFIDENCE_NAME, SCORES_NAME, ACCEPT_NAME],
    }


def read_selective_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The parsed ``abstain.selective`` metadata of a graph, or ``None`` for a plain graph."""
    for prop in model.metadata_props:
        if prop.key == META_SELECTIVE:
            return json.loads(prop.value)
    return None


def render_selective_config(
    name: str,
    spec: InputSpec,
    num_classes: int,
    num_points: int,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> str:
    """Triton ``config.pbtxt`` for a selective graph (per-item scalars as ``[1]`` + reshape)."""
    c, h, w = spec.shape

    def output(tensor: str, dtype: str, dims: str, extra: str = "") -> str:
        return f'  {{\n    name: "{tensor}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n{extra}  }}'

    scalar = "    reshape: { shape: [ ] }\n"
    outputs = ",\n".join(
        [
            output(LOGITS_NAME, "TYPE_FP32", str(num_classes), f'    label_filename: "{LABELS_FILENAME}"\n'),
            output(SELECTION_NAME, "TYPE_FP32", "1", scalar),
            output(CLASS_INDEX_NAME, "TYPE_INT64", "1", scalar),
            output(CONFIDENCE_NAME, "TYPE_FP64", "1", scalar),
            output(SCORES_NAME, "TYPE_FP64", str(num_points)),
            output(ACCEPT_NAME, "TYPE_BOOL", str(num_points)),
        ]
    )
    return (
        f'name: "{validate_model_name(name)}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f'  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_FP32\n    dims: [ {c}, {h}, {w} ]\n  }}\n'
        "]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n"
        "}\n"
    )


def build_selective(base_bytes: bytes, calibration: Calibration, calibration_sha256: str) -> onnx.ModelProto:
    """The selective graph (checked) for ``base_bytes`` and its calibration."""
    base = onnx.load_from_string(base_bytes)
    model = append_decision(base, calibration.operating_points)
    meta = selective_metadata(calibration, sha256_bytes(base_bytes), calibration_sha256)
    del model.metadata_props[:]
    for prop in base.metadata_props:
        if prop.key != META_SELECTIVE:
            model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key=META_SELECTIVE, value=json.dumps(meta, sort_keys=True))
    onnx.checker.check_model(model, full_check=True)
    return model


def verify_selective(model_bytes: bytes, calibration: Calibration, spec: InputSpec, seed: int = 0) -> None:
    """Run the graph in ONNX Runtime on random pixels (batch 1 and 64): ``accept`` must equal
    the numpy float64 decision for every operating point, else ``RuntimeError``."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    names = [o.name for o in session.get_outputs()]
    for batch in (1, 64):
        x = rng.random((batch, *spec.shape), dtype=np.float32)
        out = dict(zip(names, session.run(None, {INPUT_NAME: x}), strict=True))
        for j, point in enumerate(calibration.operating_points):
            want = selection_scores(out[LOGITS_NAME], out[SELECTION_NAME], point.score) >= point.threshold
            if not np.array_equal(out[ACCEPT_NAME][:, j], want):
                raise RuntimeError(
                    f"selective graph disagrees with the service's decision for {point.name!r}"
                )


def export_selective(
    model_dir: Path,
    name: str | None = None,
    repository: Path | None = None,
    version: int | None = None,
    force: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> SelectiveResult:
    """Build, verify and write the selective entry for ``model_dir`` (``models/NAME`` or ``models/NAME/V``).

    Defaults: ``--name`` ``<base name>-selective``, ``--repository`` the base entry's repository,
    ``--version`` the base version (so ``digits/1`` → ``digits-selective/1``).
    """
    version_dir = resolve_version_dir(Path(model_dir))
    entry_dir = version_dir.parent
    cal_path = version_dir / CALIBRATION_FILENAME
    if not cal_path.is_file():
        raise FileNotFoundError(
            f"{cal_path} does not exist: run `abstain calibrate {version_dir}` first; a selective "
            "graph bakes in the calibrated thresholds"
        )
    base_bytes = (version_dir / MODEL_FILENAME).read_bytes()
    cal_bytes = cal_path.read_bytes()
    try:
        calibration = calibration_from_dict(json.loads(cal_bytes), where=str(cal_path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cal_path} is not valid JSON: {exc}") from exc
    verify_graph(calibration, version_dir / MODEL_FILENAME, sha256_bytes(base_bytes))
    model = build_selective(base_bytes, calibration, sha256_bytes(cal_bytes))
    meta = {p.key: p.value for p in model.metadata_props}
    spec = InputSpec.from_dict(json.loads(meta[META_INPUT_SPEC]))
    class_names = json.loads(meta[META_CLASS_NAMES])
    model_bytes = model.SerializeToString(deterministic=True)
    verify_selective(model_bytes, calibration, spec)
    name = name or f"{entry_dir.name}{SELECTIVE_SUFFIX}"
    repository = Path(repository) if repository is not None else entry_dir.parent
    version = version if version is not None else int(version_dir.name)
    config = render_selective_config(
        name, spec, len(class_names), len(calibration.operating_points), max_batch_size
    )
    plan = plan_entry(repository, name, class_names, config, version=version, force=force)
    path = commit_entry(plan, model_bytes, config, class_names)
    return SelectiveResult(
        path, name, plan.version, sha256_bytes(base_bytes), sha256_bytes(cal_bytes), calibration.names
    )
