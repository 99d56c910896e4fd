"""Service configuration from environment variables, and the start-up checks of the artifacts.

``abstain serve`` sets the ``ABSTAIN_*`` variables and execs ``bentoml serve
abstain.serving.service:Abstain``; setting them by hand and running ``bentoml serve`` directly is
equivalent. The variables, their defaults and limits are :data:`abstain.serving.options.OPTIONS`
(the one table; docs/serving.md shows it).
"""

from __future__ import annotations

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
from abstain.operating_points import (
    Calibration,
    CalibrationError,
    check_score_scale,
    load_calibration,
    verify_graph,
)
from abstain.runtime import OnnxModel
from abstain.serving.cpus import usable_cpus
from abstain.serving.options import BACKENDS, OPTION, OPTIONS

__all__ = ["BACKENDS", "Artifacts", "ServeSettings", "load_artifacts", "load_graph"]


def _default(name: str):  # the field's own type
    return OPTION[name].default


@dataclass(frozen=True)
class ServeSettings:
    """Everything the service reads from its environment; defaults from :data:`OPTIONS`."""

    model_dir: Path
    operating_point: str | None = _default("operating_point")
    backend: str = _default("backend")
    triton_url: str = _default("triton_url")
    triton_timeout: float = _default("triton_timeout")
    triton_concurrency: int = _default("triton_concurrency")
    triton_probe_interval: float = _default("triton_probe_interval")
    triton_model: str | None = _default("triton_model")
    max_batch: int = _default("max_batch")
    max_json_batch: int = _default("max_json_batch")
    max_request_bytes: int = _default("max_request_bytes")
    batch_max_size: int = _default("batch_max_size")
    batch_max_latency_ms: float = _default("batch_max_latency_ms")
    workers: int = _default("workers")
    ort_threads: int = _default("ort_threads")
    max_concurrency: int = _default("max_concurrency")
    timeout: int = _default("timeout")
    rolling_window: int = _default("rolling_window")
    store: str = _default("store")
    store_dir: str | None = _default("store_dir")
    store_max_rows: int = _default("store_max_rows")
    store_max_age_days: float = _default("store_max_age_days")
    live_window: int = _default("live_window")
    review_queue: int = _default("review_queue")
    review_max_bytes: int = _default("review_max_bytes")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend should be one of {', '.join(BACKENDS)}, but got {self.backend!r}")
        postgres = self.store.startswith(("postgresql://", "postgres://"))
        if self.store not in ("sqlite", "off") and not postgres:
            raise ValueError(
                f"ABSTAIN_STORE should be sqlite, off or a postgresql:// URL, but got {self.store!r}"
            )
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.minimum is not None and not value >= option.minimum:
                raise ValueError(
                    f"{option.env} ({option.name}) should be >= {option.minimum:g}, but got {value!r}"
                )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeSettings:
        """Read every :data:`OPTIONS` variable (``os.environ`` by default); unset or empty → the default."""
        values = {o.name: o.from_env(environ) for o in OPTIONS}
        values["model_dir"] = Path(values["model_dir"] or default_repository() / DEFAULT_MODEL_NAME)
        return cls(**values)

    @property
    def json_batch(self) -> int:
        """Most images of one JSON request: ``max_json_batch``, never more than ``max_batch``."""
        return min(self.max_json_batch, self.max_batch)

    def intra_op_threads(self) -> int:
        """ONNX Runtime threads per worker: ``ort_threads``, or the usable CPUs shared by the workers.

        Usable CPUs are the process's affinity mask (a container's cpuset) capped by its cgroup
        CPU quota (a Kubernetes CPU limit): :func:`abstain.serving.cpus.usable_cpus`, not
        ``os.cpu_count()`` (the host's).
        """
        if self.ort_threads:
            return self.ort_threads
        return max(1, usable_cpus() // self.workers)


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


def triton_decides(settings: ServeSettings, artifacts: Artifacts) -> bool:
    """Whether Triton serves a selective entry (``abstain export-selective``) and so decides itself."""
    return settings.backend == "triton" and settings.triton_model not in (None, artifacts.name)


def verify_remote_backend(settings: ServeSettings, artifacts: Artifacts) -> str | None:
    """The start-up check of a Triton backend, shared by ``abstain serve`` and the service's import.

    Raises when Triton serves another graph (or a selective entry built from another
    calibration): the service must refuse to start. Returns a warning, instead of raising, when
    Triton is not reachable *yet* — pods start in any order, so the service starts not ready and
    its :class:`~abstain.serving.triton_monitor.TritonMonitor` makes it ready once the graph
    verifies. ``None`` for the embedded backend or a verified graph.
    """
    if settings.backend != "triton":
        return None
    if triton_decides(settings, artifacts):
        from abstain.serving.selective_remote import verify_selective_triton

        verify_selective_triton(settings.triton_url, artifacts.version_dir, settings.triton_model,
                                artifacts.calibration.names, timeout_s=settings.triton_timeout)
        return None
    from abstain.serving.backends import TritonUnreachableError, verify_triton_serves

    try:
        verify_triton_serves(settings.triton_url, artifacts.graph_path, artifacts.name, artifacts.version,
                             graph_sha256=artifacts.graph_sha256, timeout_s=settings.triton_timeout)
    except TritonUnreachableError as exc:
        return f"{exc}; starting, not ready until Triton serves the graph"
    return None
