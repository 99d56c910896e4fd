"""Every setting of the service, once: its ``ABSTAIN_*`` variable, type, default, limits and help.

This table is the single source of truth. :class:`abstain.serving.config.settings.ServeSettings`
takes its defaults from it and reads the environment through it, ``abstain serve`` builds its
options from it (help, default, environment variable, minimum), and the table in
docs/serving.md is :func:`markdown_table` (a test checks that it is in step).

Standard library only: ``abstain serve --help`` imports this without numpy or BentoML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

BACKENDS = ("onnxruntime", "triton")


@dataclass(frozen=True)
class Option:
    """One setting. ``name`` is the ``ServeSettings`` field and, with ``-`` for ``_``, the CLI option."""

    name: str
    kind: type  # str, int or float
    default: Any
    help: str
    minimum: float | None = None
    #: shown in the docs table when the default is not a plain value (e.g. "calibration's default")
    default_text: str | None = None

    @property
    def env(self) -> str:
        return f"ABSTAIN_{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def from_env(self, environ: dict[str, str] | os._Environ[str] | None = None) -> Any:
        """:attr:`env`'s value in ``environ`` (default ``os.environ``); the default when unset or empty.

        Raises ``ValueError`` naming the variable, what is valid and what was given.
        """
        raw = (os.environ if environ is None else environ).get(self.env)
        if raw is None or raw == "":
            return self.default
        if self.kind is str:
            return raw
        noun = "an integer" if self.kind is int else "a number"
        valid = f"{noun} >= {self.minimum:g}" if self.minimum is not None else noun
        try:
            value = self.kind(raw)
        except ValueError:
            raise ValueError(f"{self.env} should be {valid}, but got {raw!r}") from None
        if self.minimum is not None and not value >= self.minimum:  # `not >=` also refuses NaN
            raise ValueError(f"{self.env} should be {valid}, but got {raw!r}")
        return value


OPTIONS: tuple[Option, ...] = (
    Option(
        "model_dir",
        str,
        None,
        "models/<name> (latest version) or models/<name>/<version>",
        default_text="the embedded `models/digits`",
    ),
    Option(
        "operating_point",
        str,
        None,
        "operating point answers use by default (a calibration.json name)",
        default_text="calibration's default",
    ),
    Option("backend", str, "onnxruntime", "inference backend: onnxruntime (embedded) or triton (remote)"),
    Option("triton_url", str, "127.0.0.1:8000", "Triton endpoint: host:port (HTTP) or grpc://host:port"),
    Option(
        "triton_timeout",
        float,
        10.0,
        "seconds one Triton call may take before the request gets a 503",
        minimum=0.001,
    ),
    # Triton calls in flight per worker, and how often the graph Triton serves is re-checked
    Option(
        "triton_concurrency", int, 4, "Triton calls in flight per worker (Triton batches them)", minimum=1
    ),
    Option(
        "triton_probe_interval",
        float,
        5.0,
        "seconds between checks that Triton still serves the calibrated graph (and after a failed call)",
        minimum=0.1,
    ),
    Option(
        "triton_model",
        str,
        None,
        "Triton model the triton backend calls; a selective entry (`abstain export-selective`) makes "
        "Triton decide",
        default_text="the served entry's name",
    ),
    # the Open Inference Protocol over gRPC, beside /v2 over HTTP (serving/http/grpc_service.py)
    Option(
        "grpc_port",
        int,
        0,
        "port of the Open Inference Protocol gRPC service (inference.GRPCInferenceService, as "
        "tritonclient.grpc speaks it), shared by the workers; 0: off; needs the triton-client extra",
        minimum=0,
    ),
    Option("grpc_host", str, "0.0.0.0", "address the gRPC service listens on (with grpc_port)"),
    Option("max_batch", int, 256, "most images one request may carry", minimum=1),
    # bound what one request holds: parsed JSON takes up to ~23 bytes of memory per body byte
    # (docs/benchmarks.md, "Measurements behind design choices"), a .npy body its own size
    Option(
        "max_json_batch",
        int,
        64,
        "most images one JSON request may carry (at most max_batch; .npy bodies may carry max_batch)",
        minimum=1,
    ),
    Option(
        "max_request_bytes",
        int,
        32 * 1024 * 1024,
        "largest /predict .npy body in bytes; JSON: half of it (a 3x224x224 worker stays under 1 GiB)",
        minimum=1024,
    ),
    Option("batch_max_size", int, 64, "adaptive batching: most images per forward pass", minimum=1),
    Option(
        "batch_max_latency_ms",
        float,
        0.0,
        "adaptive batching: longest wait to fill a batch (ms); 0 batches what queued up during the "
        "previous pass",
        minimum=0.0,
    ),
    Option("workers", int, 1, "BentoML worker processes", minimum=1),
    Option(
        "ort_threads",
        int,
        0,
        "ONNX Runtime intra-op threads per worker; 0: the usable CPUs (affinity mask, cgroup CPU quota) "
        "divided by the workers",
        minimum=0,
    ),
    Option("max_concurrency", int, 64, "requests in flight per worker before a 429", minimum=1),
    Option("timeout", int, 30, "seconds before a request is answered 504", minimum=1),
    Option("rolling_window", int, 1000, "decisions in the rolling abstention-rate gauge", minimum=1),
    # decision store and live risk (serving/store/decision_store.py, serving/store/live.py)
    Option(
        "store",
        str,
        "sqlite",
        "decision store: sqlite (a WAL file in the store directory), a postgresql:// URL, or off",
    ),
    Option(
        "store_dir",
        str,
        None,
        "directory of the SQLite decision store",
        default_text="`$BENTOML_HOME/abstain-store`",
    ),
    Option("store_max_rows", int, 1_000_000, "decisions kept; the oldest are dropped beyond it", minimum=1),
    Option("store_max_age_days", float, 30.0, "days a decision is kept", minimum=0.0001),
    Option("live_window", int, 1000, "labelled decisions in the live selective-risk gauges", minimum=1),
    Option(
        "review_queue",
        int,
        0,
        "abstained inputs kept for people to label (GET /review); 0: no review queue",
        minimum=0,
    ),
    Option(
        "review_max_bytes",
        int,
        64 * 1024 * 1024,
        "pixel bytes the review queue keeps (float32 inputs); the oldest are dropped first",
        minimum=1,
    ),
)
OPTION = {o.name: o for o in OPTIONS}


def markdown_table() -> str:
    """The settings as the Markdown table of docs/serving.md."""
    rows = ["| variable | `abstain serve` option | meaning | default |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = o.default_text or f"`{o.default}`"
        flag = "argument `MODEL_DIR`" if o.name == "model_dir" else f"`{o.flag}`"
        rows.append(f"| `{o.env}` | {flag} | {o.help} | {default} |")
    return "\n".join(rows)
