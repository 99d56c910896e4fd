"""Service configuration from environment variables, and the start-up checks of the artifacts.

``abstain serve`` sets these variables and execs ``bentoml serve abstain.serving.service:Abstain``;
setting them by hand and running ``bentoml serve`` directly is equivalent.

==================================  ================================================  ===========
variable                            meaning                                           default
==================================  ================================================  ===========
``ABSTAIN_MODEL_DIR``               ``models/<name>`` (latest version) or ``…/<v>``   ``models/digits``
``ABSTAIN_OPERATING_POINT``         default operating point of answers                calibration's default
``ABSTAIN_BACKEND``                 ``onnxruntime`` (embedded) or ``triton``          ``onnxruntime``
``ABSTAIN_TRITON_URL``              ``host:port`` (HTTP) or ``grpc://host:port``      ``127.0.0.1:8000``
``ABSTAIN_TRITON_TIMEOUT``          seconds one Triton call may take, then 503        10
``ABSTAIN_MAX_BATCH``               most images one request may carry                 256
``ABSTAIN_BATCH_MAX_SIZE``          adaptive batching: most images per forward pass   64
``ABSTAIN_BATCH_MAX_LATENCY_MS``    adaptive batching: longest wait to fill a batch   0
``ABSTAIN_WORKERS``                 BentoML worker processes                          1
``ABSTAIN_MAX_CONCURRENCY``         requests in flight per service before 429/503     64
``ABSTAIN_TIMEOUT``                 seconds before a request is answered 504          30
``ABSTAIN_ROLLING_WINDOW``          decisions in the rolling abstention-rate gauge    1000
==================================  ================================================  ===========
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from abstain.contract import (
    CALIBRATION_FILENAME,
    DEFAULT_MODEL_NAME,
    LABELS_FILENAME,
    MODEL_FILENAME,
    default_repository,
    read_labels,
    resolve_version_dir,
)
from abstain.operating_points import Calibration, CalibrationError, load_calibration, verify_graph
from abstain.runtime import OnnxModel

BACKENDS = ("onnxruntime", "triton")


def _int_env(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} should be an integer >= {minimum}, but got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} should be an integer >= {minimum}, but got {value}")
    return value


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} should be a number >= 0, but got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{name} should be a number >= 0, but got {raw!r}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    """Everything the service reads from its environment (see the module docstring)."""

    model_dir: Path
    operating_point: str | None = None
    backend: str = "onnxruntime"
    triton_url: str = "127.0.0.1:8000"
    triton_timeout: float = 10.0
    max_batch: int = 256
    batch_max_size: int = 64
    batch_max_latency_ms: float = 0.0
    workers: int = 1
    max_concurrency: int = 64
    timeout: int = 30
    rolling_window: int = 1000

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend should be one of {', '.join(BACKENDS)}, but got {self.backend!r}")
        if not self.triton_timeout > 0:
            raise ValueError(f"ABSTAIN_TRITON_TIMEOUT should be > 0 seconds, but got {self.triton_timeout!r}")

    @classmethod
    def from_env(cls) -> ServeSettings:
        model_dir = os.environ.get("ABSTAIN_MODEL_DIR") or str(default_repository() / DEFAULT_MODEL_NAME)
        return cls(
            model_dir=Path(model_dir),
            operating_point=os.environ.get("ABSTAIN_OPERATING_POINT") or None,
            backend=os.environ.get("ABSTAIN_BACKEND", "onnxruntime"),
            triton_url=os.environ.get("ABSTAIN_TRITON_URL", "127.0.0.1:8000"),
            triton_timeout=_float_env("ABSTAIN_TRITON_TIMEOUT", 10.0),
            max_batch=_int_env("ABSTAIN_MAX_BATCH", 256),
            batch_max_size=_int_env("ABSTAIN_BATCH_MAX_SIZE", 64),
            batch_max_latency_ms=_float_env("ABSTAIN_BATCH_MAX_LATENCY_MS", 0.0),
            workers=_int_env("ABSTAIN_WORKERS", 1),
            max_concurrency=_int_env("ABSTAIN_MAX_CONCURRENCY", 64),
            timeout=_int_env("ABSTAIN_TIMEOUT", 30),
            rolling_window=_int_env("ABSTAIN_ROLLING_WINDOW", 1000),
        )


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
    return model
