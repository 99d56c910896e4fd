"""The artifacts the service serves, checked at start-up: graph, calibration, labels.

A model-repository entry's version directory is resolved, its graph hashed and compared with
the calibration's sha256, and the operating point checked; a failure raises before BentoML
starts a worker (the service imports :func:`load_artifacts` at module level).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from abstain.contract import (
    CALIBRATION_FILENAME,
    LABELS_FILENAME,
    MODEL_FILENAME,
    read_labels,
    resolve_version_dir,
)
from abstain.operating_points import (
    Calibration,
    CalibrationError,
    check_score_scale,
    load_calibration,
    verify_graph,
)
from abstain.runtime import OnnxModel


@dataclass(frozen=True)
class Artifacts:
    """A verified model version: its graph, the calibration fitted on it, its names."""

    name: str  # model-repository entry, e.g. "digits"
    version: str  # version directory, e.g. "1"
    version_dir: Path
    graph_path: Path
    graph_sha256: str
    calibration: Calibration
    labels: list[str] | None  # labels.txt of the entry, if present

    @property
    def entry_dir(self) -> Path:
        return self.version_dir.parent


def load_artifacts(model_dir: Path, operating_point: str | None = None) -> Artifacts:
    """Resolve ``model_dir``, then check the graph, its calibration and the operating point.

    Raises ``FileNotFoundError`` (no graph), ``abstain.operating_points.CalibrationError`` (calibration
    missing, malformed or for another graph — each message says how to fix it) or
    ``ValueError`` (unknown operating point, listing the valid ones). Cheap (one sha256), so it
    also runs when ``bentoml serve`` imports the service, which then refuses to start.
    """
    version_dir = resolve_version_dir(Path(model_dir))
    graph = version_dir / MODEL_FILENAME
    if not graph.is_file():
        raise FileNotFoundError(f"{version_dir} has no {MODEL_FILENAME}; export one with `abstain export`")
    calibration = load_calibration(version_dir / CALIBRATION_FILENAME)
    sha = verify_graph(calibration, graph)
    if operating_point is not None and operating_point not in calibration.names:
        raise ValueError(
            f"unknown operating point {operating_point!r} for {version_dir / CALIBRATION_FILENAME}; "
            f"valid: {', '.join(calibration.names)}"
        )
    labels_path = version_dir.parent / LABELS_FILENAME
    labels = read_labels(labels_path) if labels_path.is_file() else None
    return Artifacts(
        name=version_dir.resolve().parent.name,
        version=version_dir.name,
        version_dir=version_dir,
        graph_path=graph,
        graph_sha256=sha,
        calibration=calibration,
        labels=labels,
    )


def load_graph(
    artifacts: Artifacts, intra_op_threads: int | None = None, prefer_cuda: bool = True
) -> OnnxModel:
    """The calibrated graph in ONNX Runtime, built from bytes whose sha256 matches the calibration.

    :func:`load_artifacts` hashed the file when the service was imported; a worker opens it
    later, and ``abstain export --force`` may have replaced it in between. The graph is read
    once, hashed and loaded from those same bytes (:class:`abstain.runtime.OnnxModel`), and
    refused with ``CalibrationError`` unless the hash is still the calibration's.
    """
    model = OnnxModel(artifacts.graph_path, intra_op_threads=intra_op_threads, prefer_cuda=prefer_cuda)
    try:
        verify_graph(artifacts.calibration, artifacts.graph_path, model.sha256)
    except CalibrationError as exc:
        raise CalibrationError(
            f"{exc} (the graph changed on disk after the service checked it at start-up; restart "
            "the service once the model directory holds a graph and its calibration together)"
        ) from exc
    # a logit threshold against g in [0, 1] (or the reverse) would answer everything or nothing
    check_score_scale(artifacts.calibration, model.has_selection_logit, str(artifacts.graph_path))
    return model
