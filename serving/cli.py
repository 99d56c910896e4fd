"""``abstain serve``: check the artifacts, then exec ``bentoml serve abstain.serving.service:Abstain``.

Only typer, the standard library and the settings table (:mod:`abstain.serving.options`,
from which every option's help, default, environment variable and minimum come) at import
time, so ``abstain --help`` stays fast and torch-free; the artifact check imports numpy-level
code only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from abstain.serving.options import OPTION

SERVICE = "abstain.serving.service:Abstain"


def _option(name: str, **extra: object) -> typer.models.OptionInfo:
    """A typer option built from :data:`OPTIONS` (help, environment variable, minimum)."""
    o = OPTION[name]
    if o.minimum is not None:
        extra.setdefault("min", o.minimum)
    return typer.Option(o.flag, help=o.help, envvar=o.env, **extra)  # type: ignore[arg-type]


def serve(
    model_dir: Annotated[
        Path | None,
        typer.Argument(help=f"{OPTION['model_dir'].help}; default: the embedded digits model",
                       envvar=OPTION["model_dir"].env),
    ] = None,
    operating_point: Annotated[str | None, _option("operating_point")] = OPTION["operating_point"].default,
    host: Annotated[str, typer.Option(help="address to bind", envvar="ABSTAIN_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port", envvar="ABSTAIN_PORT")] = 3000,
    workers: Annotated[int, _option("workers")] = OPTION["workers"].default,
    backend: Annotated[str, _option("backend")] = OPTION["backend"].default,
    triton_url: Annotated[str, _option("triton_url")] = OPTION["triton_url"].default,
    triton_timeout: Annotated[float, _option("triton_timeout")] = OPTION["triton_timeout"].default,
    triton_concurrency: Annotated[int, _option("triton_concurrency")] = OPTION["triton_concurrency"].default,
    triton_probe_interval: Annotated[float, _option("triton_probe_interval")] = (
        OPTION["triton_probe_interval"].default
    ),
    max_batch: Annotated[int, _option("max_batch")] = OPTION["max_batch"].default,
    max_json_batch: Annotated[int, _option("max_json_batch")] = OPTION["max_json_batch"].default,
    max_request_bytes: Annotated[int, _option("max_request_bytes")] = OPTION["max_request_bytes"].default,
    batch_max_size: Annotated[int, _option("batch_max_size")] = OPTION["batch_max_size"].default,
    batch_max_latency_ms: Annotated[float, _option("batch_max_latency_ms")] = (
        OPTION["batch_max_latency_ms"].default
    ),
    ort_threads: Annotated[int, _option("ort_threads")] = OPTION["ort_threads"].default,
    max_concurrency: Annotated[int, _option("max_concurrency")] = OPTION["max_concurrency"].default,
    timeout: Annotated[int, _option("timeout")] = OPTION["timeout"].default,
    rolling_window: Annotated[int, _option("rolling_window")] = OPTION["rolling_window"].default,
) -> None:
    """Serve a model over HTTP: every answer is a prediction or an explained abstention.

    Every option can also come from its ABSTAIN_* environment variable (a container's or a
    Kubernetes ConfigMap's); a flag on the command line wins over the variable.
    """
    from abstain.contract import DEFAULT_MODEL_NAME, default_repository
    from abstain.serving.settings import ServeSettings, load_artifacts

    values = {name: value for name, value in locals().items() if name in OPTION}
    model_dir = (model_dir or default_repository() / DEFAULT_MODEL_NAME).resolve()
    values["model_dir"] = model_dir
    settings = ServeSettings(**values)  # the same checks as the service's (backend, minimums)
    # refuse here, with one clear line, before BentoML starts anything
    artifacts = load_artifacts(model_dir, operating_point)
    if settings.backend == "triton":
        from abstain.serving.backends import TritonUnreachableError, verify_triton_serves

        try:
            verify_triton_serves(
                settings.triton_url, artifacts.graph_path, artifacts.name, artifacts.version,
                graph_sha256=artifacts.graph_sha256, timeout_s=settings.triton_timeout,
            )
        except TritonUnreachableError as exc:
            # pods start in any order: serve, not ready, until the graph verifies; a wrong graph
            # (GraphMismatchError) still refuses here
            print(f"warning: {exc}; starting, not ready until Triton serves the graph", file=sys.stderr)
    env = dict(os.environ)
    values["model_dir"] = artifacts.version_dir.resolve()
    for name, value in values.items():
        if value is None:  # unset: the service's default (operating point: the calibration's)
            env.pop(OPTION[name].env, None)
        else:
            env[OPTION[name].env] = str(value)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    argv = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)
