"""Service configuration from environment variables (the artifacts are checked by
:mod:`abstain.serving.inference.artifacts`).

``abstain serve`` sets the ``ABSTAIN_*`` variables and execs ``bentoml serve
abstain.serving.service:Abstain``; setting them by hand and running ``bentoml serve`` directly is
equivalent. The variables, their defaults and limits are :data:`abstain.serving.config.options.OPTIONS`
(the one table; docs/serving.md shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from abstain.contract import DEFAULT_MODEL_NAME, default_repository
from abstain.serving.config.cpus import usable_cpus
from abstain.serving.config.options import BACKENDS, OPTION, OPTIONS

__all__ = ["BACKENDS", "ServeSettings"]


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
    grpc_port: int = _default("grpc_port")
    grpc_host: str = _default("grpc_host")
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
        CPU quota (a Kubernetes CPU limit): :func:`abstain.serving.config.cpus.usable_cpus`, not
        ``os.cpu_count()`` (the host's).
        """
        if self.ort_threads:
            return self.ort_threads
        return max(1, usable_cpus() // self.workers)
