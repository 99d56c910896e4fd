"""``abstain serve``: check the artifacts, then exec ``bentoml serve abstain.serving.service:Abstain``.

Only typer and the standard library at import time (``abstain --help`` stays fast and
torch-free); the artifact check imports numpy-level code only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

SERVICE = "abstain.serving.service:Abstain"


def serve(
    model_dir: Annotated[
        Path | None,
        typer.Argument(
            help="models/<name> (latest version) or models/<name>/<version>; "
            "default: the embedded digits model",
            envvar="ABSTAIN_MODEL_DIR",
        ),
    ] = None,
    operating_point: Annotated[
        str | None, typer.Option(help="operating point answers use by default (calibration.json name)",
                                  envvar="ABSTAIN_OPERATING_POINT")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind", envvar="ABSTAIN_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port", envvar="ABSTAIN_PORT")] = 3000,
    workers: Annotated[
        int, typer.Option(min=1, help="BentoML worker processes", envvar="ABSTAIN_WORKERS")
    ] = 1,
    backend: Annotated[str, typer.Option(help="onnxruntime (embedded) or triton (remote)",
                                           envvar="ABSTAIN_BACKEND")] = "onnxruntime",
    triton_url: Annotated[
        str, typer.Option(help="Triton endpoint: host:port (HTTP) or grpc://host:port",
                     envvar="ABSTAIN_TRITON_URL")
    ] = "127.0.0.1:8000",
    triton_timeout: Annotated[
        float, typer.Option(min=0.001, help="seconds one Triton call may take before a 503",
                            envvar="ABSTAIN_TRITON_TIMEOUT")
    ] = 10.0,
    max_batch: Annotated[int, typer.Option(min=1, help="most images one request may carry",
                                           envvar="ABSTAIN_MAX_BATCH")] = 256,
    batch_max_size: Annotated[int, typer.Option(min=1, help="adaptive batching: most images per pass",
                                                envvar="ABSTAIN_BATCH_MAX_SIZE")] = 64,
    batch_max_latency_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="adaptive batching: longest wait to fill a batch (ms); "
            "0 batches what queued up during the previous pass",
            envvar="ABSTAIN_BATCH_MAX_LATENCY_MS",
        ),
    ] = 0.0,
    max_concurrency: Annotated[int, typer.Option(min=1, help="in-flight requests before 429",
                                                 envvar="ABSTAIN_MAX_CONCURRENCY")] = 64,
    timeout: Annotated[int, typer.Option(min=1, help="seconds before a request is answered 504",
                                         envvar="ABSTAIN_TIMEOUT")] = 30,
) -> None:
    """Serve a model over HTTP: every answer is a prediction or an explained abstention.

    Every option can also come from its ABSTAIN_* environment variable (a container's or a
    Kubernetes ConfigMap's); a flag on the command line wins over the variable.
    """
    from abstain.contract import DEFAULT_MODEL_NAME, default_repository
    from abstain.serving.settings import BACKENDS, load_artifacts

    if backend not in BACKENDS:
        raise ValueError(f"--backend should be one of {', '.join(BACKENDS)}, but got {backend!r}")
    model_dir = (model_dir or default_repository() / DEFAULT_MODEL_NAME).resolve()
    # refuse here, with one clear line, before BentoML starts anything
    artifacts = load_artifacts(model_dir, operating_point)
    if backend == "triton":
        from abstain.serving.backends import verify_triton_serves

        verify_triton_serves(
            triton_url, artifacts.graph_path, artifacts.name, artifacts.version,
            graph_sha256=artifacts.graph_sha256, timeout_s=triton_timeout,
        )
    env = dict(os.environ)
    env.update(
        {
            "ABSTAIN_MODEL_DIR": str(artifacts.version_dir.resolve()),
            "ABSTAIN_BACKEND": backend,
            "ABSTAIN_TRITON_URL": triton_url,
            "ABSTAIN_TRITON_TIMEOUT": str(triton_timeout),
            "ABSTAIN_WORKERS": str(workers),
            "ABSTAIN_MAX_BATCH": str(max_batch),
            "ABSTAIN_BATCH_MAX_SIZE": str(batch_max_size),
            "ABSTAIN_BATCH_MAX_LATENCY_MS": str(batch_max_latency_ms),
            "ABSTAIN_MAX_CONCURRENCY": str(max_concurrency),
            "ABSTAIN_TIMEOUT": str(timeout),
        }
    )
    if operating_point:
        env["ABSTAIN_OPERATING_POINT"] = operating_point
    else:
        env.pop("ABSTAIN_OPERATING_POINT", None)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    argv = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)
