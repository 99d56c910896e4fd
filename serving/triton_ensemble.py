"""``abstain triton-ensemble``: decisions counted on Triton's own ``/metrics``, no Python front door.

Writes, into a Triton model repository, three entries for a selective graph made by
``abstain export-selective`` (``models/<name>-selective/<v>``)::

    <repo>/<name>-selective/            the selective graph (as it is, or through the Python
                                        stand-in with --python-backend, see triton_repository)
    <repo>/<name>-selective-metrics/    Python-backend step: counts accept per operating point
                                        (serving/triton_metrics_model/model.py)
    <repo>/<name>-selective-monitored/  the ensemble clients call: graph -> metrics step

The metrics step exports ``abstain_decisions_total`` and ``abstain_target_coverage`` with the
service's names and labels (``serving/metrics.py``), so ``deploy/prometheus/rules.yml``'s
abstention-rate rules and alerts read Triton exactly as they read ``abstain serve``. The
labels ``model``/``version`` are the *base* model's (e.g. ``digits``/``1``), taken from
``--model``/``--model-version`` (default: the selective entry's name without ``-selective``
and its version), so a dashboard filtered on ``model="digits"`` shows both paths.

Only the standard library, typer and onnxruntime (to read the graph's metadata): a serving module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from abstain.contract import (
    ACCEPT_NAME,
    CLASS_INDEX_NAME,
    CONFIDENCE_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    META_SELECTIVE,
    MODEL_FILENAME,
    SCORES_NAME,
    SELECTION_NAME,
    SELECTIVE_SUFFIX,
    TRITON_CONFIG_FILENAME,
    resolve_version_dir,
    validate_model_name,
)
from abstain.io import atomic_write_text

METRICS_MODEL = Path(__file__).with_name("triton_metrics_model") / "model.py"
METRICS_SUFFIX, MONITORED_SUFFIX = "-metrics", "-monitored"


def read_selective_points(graph: Path) -> dict[str, Any]:
    """The ``abstain.selective`` metadata of ``graph``; ``ValueError`` if it is a plain graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if META_SELECTIVE not in meta:
        raise ValueError(
            f"{graph} is not a selective graph (no {META_SELECTIVE} metadata): make one with "
            "`abstain export-selective MODEL_DIR` first"
        )
    return json.loads(meta[META_SELECTIVE])


def metrics_config(
    name: str, num_points: int, model: str, version: str, points: list[dict[str, Any]], max_batch_size: int
) -> str:
    """``config.pbtxt`` of the metrics step: accept [P] in, accept [P] out, labels as parameters."""
    # as serving/metrics.py: a risk point's gauge is the coverage calibration measured for it
    compact = json.dumps(
        [
            {
                "name": p["name"],
                "target_coverage": p["target_coverage"]
                if p.get("target_coverage") is not None
                else p.get("coverage"),
            }
            for p in points
        ]
    )
    parameters = {"model": model, "version": version, "operating_points": compact}
    params = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
        for k, v in parameters.items()
    )
    tensor = f'{{ name: "{ACCEPT_NAME}" data_type: TYPE_BOOL dims: [ {num_points} ] }}'
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"input [ {tensor} ]\noutput [ {tensor} ]\n{params}\n"
        "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
    )


def ensemble_config(
    name: str,
    selective: str,
    metrics: str,
    spec_dims: str,
    num_classes: int,
    num_points: int,
    max_batch_size: int,
) -> str:
    """``config.pbtxt`` of the ensemble: pixels -> selective graph -> metrics step (accept)."""
    passthrough = [
        (LOGITS_NAME, "TYPE_FP32", str(num_classes)),
        (SELECTION_NAME, "TYPE_FP32", "1"),
        (CLASS_INDEX_NAME, "TYPE_INT64", "1"),
        (CONFIDENCE_NAME, "TYPE_FP64", "1"),
        (SCORES_NAME, "TYPE_FP64", str(num_points)),
    ]
    # per-item scalars are [N, 1] between ensemble steps (Triton infers the graph's dims, not its reshape)
    outputs = [
        f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}'
        for n, t, d in [*passthrough, (ACCEPT_NAME, "TYPE_BOOL", str(num_points))]
    ]
    graph_outputs = "\n".join(f'      output_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in passthrough)
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {spec_dims} ] }} ]\n'
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "ensemble_scheduling {\n  step [\n"
        f'    {{\n      model_name: "{selective}"\n      model_version: -1\n'
        f'      input_map {{ key: "{INPUT_NAME}" value: "{INPUT_NAME}" }}\n{graph_outputs}\n'
        f'      output_map {{ key: "{ACCEPT_NAME}" value: "graph_{ACCEPT_NAME}" }}\n    }},\n'
        f'    {{\n      model_name: "{metrics}"\n      model_version: -1\n'
        f'      input_map {{ key: "{ACCEPT_NAME}" value: "graph_{ACCEPT_NAME}" }}\n'
        f'      output_map {{ key: "{ACCEPT_NAME}" value: "{ACCEPT_NAME}" }}\n    }}\n'
        "  ]\n}\n"
    )


def write_ensemble(
    selective_dir: Path,
    repository: Path,
    model: str | None = None,
    model_version: str | None = None,
    python_backend: bool = False,
    max_batch_size: int = 256,
) -> str:
    """Write the three entries for ``selective_dir`` (``models/X-selective[/V]``); return the ensemble name.

    ``python_backend`` serves the graph through the Python stand-in (the nvidia-pytriton wheel
    has no ``onnxruntime_onnx`` backend); otherwise the entry is copied as it is.
    """
    version_dir = resolve_version_dir(Path(selective_dir))
    entry = version_dir.parent
    selective = validate_model_name(entry.name)
    meta = read_selective_points(version_dir / MODEL_FILENAME)
    points = meta["operating_points"]
    config_text = (entry / TRITON_CONFIG_FILENAME).read_text()
    import re

    dims = re.search(rf'name: "{INPUT_NAME}"\s*data_type: TYPE_FP32\s*dims: \[([^\]]*)\]', config_text)
    classes = re.search(rf'name: "{LOGITS_NAME}"\s*data_type: TYPE_FP32\s*dims: \[([^\]]*)\]', config_text)
    if dims is None or classes is None:
        raise ValueError(f"{entry / TRITON_CONFIG_FILENAME} does not declare {INPUT_NAME}/{LOGITS_NAME} dims")
    repository = Path(repository)
    if python_backend:
        from abstain.serving.triton_repository import write_python_backend_repository

        write_python_backend_repository(version_dir, repository)
    elif entry.resolve() != (repository / selective).resolve():
        shutil.copytree(entry, repository / selective, dirs_exist_ok=True)
    metrics, monitored = selective + METRICS_SUFFIX, selective + MONITORED_SUFFIX
    model = model or selective.removesuffix(SELECTIVE_SUFFIX)
    model_version = model_version or version_dir.name
    atomic_write_text(
        repository / metrics / TRITON_CONFIG_FILENAME,
        metrics_config(metrics, len(points), model, model_version, points, max_batch_size),
    )
    (repository / metrics / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(METRICS_MODEL, repository / metrics / "1" / "model.py")
    atomic_write_text(
        repository / monitored / TRITON_CONFIG_FILENAME,
        ensemble_config(
            monitored,
            selective,
            metrics,
            dims.group(1).strip(),
            int(classes.group(1)),
            len(points),
            max_batch_size,
        ),
    )
    (repository / monitored / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version dir
    return monitored


def triton_ensemble(
    selective_dir: Annotated[
        Path,
        typer.Argument(
            help="A selective entry made by `abstain export-selective`: models/NAME-selective[/VERSION]."
        ),
    ],
    repository: Annotated[Path, typer.Option(help="Triton model repository to write into.")],
    model: Annotated[
        str | None,
        typer.Option(help="`model` label of the metrics; default: the entry name without -selective."),
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(help="`version` label of the metrics; default: the selective entry's version."),
    ] = None,
    python_backend: Annotated[
        bool,
        typer.Option(
            help="Serve the graph through the Python-backend ONNX Runtime stand-in (Triton builds "
            "without onnxruntime_onnx, e.g. the nvidia-pytriton wheel)."
        ),
    ] = False,
) -> None:
    """Write a Triton ensemble (selective graph -> metrics step) that counts decisions on Triton's /metrics.

    Clients call NAME-selective-monitored; Triton's /metrics then carries abstain_decisions_total and
    abstain_target_coverage with the same names and labels as `abstain serve`, so the Prometheus
    rules and dashboard in deploy/ work unchanged. Start Triton with metrics on (the default).
    """
    name = write_ensemble(selective_dir, repository, model, model_version, python_backend)
    typer.echo(f"wrote ensemble {name} in {repository}")
