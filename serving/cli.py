"""``abstain serve``: check the artifacts, then exec ``bentoml serve abstain.serving.service:Abstain``.

Only typer, the standard library and the settings table (:mod:`abstain.serving.config.options`,
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

from abstain.serving.config.options import OPTION

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
        typer.Argument(
            help=f"{OPTION['model_dir'].help}; default: the embedded digits model",
            envvar=OPTION["model_dir"].env,
        ),
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
    triton_model: Annotated[str | None, _option("triton_model")] = OPTION["triton_model"].default,
    grpc_port: Annotated[int, _option("grpc_port")] = OPTION["grpc_port"].default,
    grpc_host: Annotated[str, _option("grpc_host")] = OPTION["grpc_host"].default,
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
    store: Annotated[str, _option("store")] = OPTION["store"].default,
    store_dir: Annotated[str | None, _option("store_dir")] = OPTION["store_dir"].default,
    store_max_rows: Annotated[int, _option("store_max_rows")] = OPTION["store_max_rows"].default,
    store_max_age_days: Annotated[float, _option("store_max_age_days")] = (
        OPTION["store_max_age_days"].default
    ),
    live_window: Annotated[int, _option("live_window")] = OPTION["live_window"].default,
    review_queue: Annotated[int, _option("review_queue")] = OPTION["review_queue"].default,
    review_max_bytes: Annotated[int, _option("review_max_bytes")] = OPTION["review_max_bytes"].default,
) -> None:
    """Serve a model over HTTP: every answer is a prediction or an explained abstention.

    Every option can also come from its ABSTAIN_* environment variable (a container's or a
    Kubernetes ConfigMap's); a flag on the command line wins over the variable.
    """
    from abstain.contract import DEFAULT_MODEL_NAME, default_repository
    from abstain.serving.config.settings import ServeSettings
    from abstain.serving.inference.artifacts import load_artifacts
    from abstain.serving.triton.startup import verify_remote_backend

    values = {name: value for name, value in locals().items() if name in OPTION}
    model_dir = (model_dir or default_repository() / DEFAULT_MODEL_NAME).resolve()
    values["model_dir"] = model_dir
    settings = ServeSettings(**values)  # the same checks as the service's (backend, minimums)
    # refuse here, with one clear line, before BentoML starts anything
    artifacts = load_artifacts(model_dir, operating_point)
    warning = verify_remote_backend(settings, artifacts)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
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


def review(
    action: Annotated[str, typer.Argument(help="what to do with the review queue: export")],
    directory: Annotated[Path, typer.Argument(help="new directory to write the labelled items to")],
    format: Annotated[str, typer.Option(help="npz (DIR/review.npz) or imagefolder (DIR/<class>/…)")] = "npz",
    model: Annotated[str | None, typer.Option(help="only this model's items (default: the only one)")] = None,
    version: Annotated[str | None, typer.Option(help="only this version's items")] = None,
    store: Annotated[str, _option("store")] = OPTION["store"].default,
    store_dir: Annotated[str | None, _option("store_dir")] = OPTION["store_dir"].default,
) -> None:
    """Export the labelled review items (abstentions labelled via POST /feedback) as data that
    `abstain calibrate --data` reads: the hardest inputs become the next round's data.

    Example: abstain review export review-round-1 --format imagefolder
    """
    from abstain.serving.store.decision_store import Retention, SqliteStore, open_store
    from abstain.serving.store.live import default_store_dir
    from abstain.serving.store.review_export import FORMATS, export, select

    if action != "export":
        raise typer.BadParameter(f"action should be export, but got {action!r}", param_hint="ACTION")
    if format not in FORMATS:
        raise typer.BadParameter(
            f"should be one of {', '.join(FORMATS)}, but got {format!r}", param_hint="--format"
        )
    if store == "off":
        raise typer.BadParameter("there is no store to export from", param_hint="--store")
    directory_of_store = Path(store_dir) if store_dir else default_store_dir()
    if store == "sqlite" and not (directory_of_store / SqliteStore.FILENAME).is_file():
        typer.echo(
            f"error: no decision store in {directory_of_store}; give the service's --store-dir", err=True
        )
        raise typer.Exit(1)
    # reading only: retention is enforced by writes, which this never makes
    opened = open_store(store, directory_of_store, Retention(max_rows=1, max_age_s=1.0))
    try:
        items = select(opened.labelled_reviews(), model, version)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        opened.close()
    written = export(items, directory, format)
    typer.echo(f"wrote {len(items)} labelled review items to {written}")
