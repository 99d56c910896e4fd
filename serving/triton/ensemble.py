"""A Triton ensemble that serves a selective graph and counts its decisions on Triton's ``/metrics``.

Monitoring without the Python front door: ``<entry>-monitored`` = the selective entry
(``abstain export-selective``) → ``abstain-decision-counter`` (``serving/triton/decision_counter``,
a Python-backend step that counts ``accept`` per operating point under the service's metric
names and labels, and passes it through). Written next to the selective entry in a Triton
model repository::

    <repo>/<entry>-monitored/config.pbtxt           platform: "ensemble"
    <repo>/<entry>-monitored/<v>/                   (empty: Triton wants a version directory)
    <repo>/abstain-decision-counter-<entry>/config.pbtxt, 1/model.py

No torch or onnx: the operating points are read from the graph's metadata with ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from abstain.contract import (
    ACCEPT_NAME,
    CLASS_INDEX_NAME,
    INPUT_NAME,
    META_INPUT_SPEC,
    META_SELECTIVE,
    MODEL_FILENAME,
    SCORES_NAME,
    SELECTIVE_SUFFIX,
    InputSpec,
    validate_model_name,
)
from abstain.io import atomic_write_text

COUNTER_MODEL = Path(__file__).with_name("decision_counter") / "model.py"
MONITORED_SUFFIX = "-monitored"


def selective_metadata(graph: Path) -> tuple[dict, InputSpec]:
    """The ``abstain.selective`` metadata (``META_SELECTIVE``) and the input spec of a selective graph."""
    import onnxruntime as ort

    props = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).get_modelmeta()
    meta = props.custom_metadata_map
    if META_SELECTIVE not in meta:
        raise ValueError(f"{graph} is not a selective graph: make one with `abstain export-selective`")
    return json.loads(meta[META_SELECTIVE]), InputSpec.from_dict(json.loads(meta[META_INPUT_SPEC]))


def write_monitored_ensemble(
    version_dir: Path, repository: Path, model_label: str | None = None, max_batch_size: int = 256
) -> str:
    """Write the ensemble for the selective entry version ``version_dir`` into ``repository``.

    ``model_label`` is the ``model`` label of the counters (default: the entry name without
    ``-selective``, i.e. the name the service reports for the base model); ``version`` is the
    entry's version. Returns the ensemble's Triton model name. The selective entry itself
    must be served from the same repository under its own name.
    """
    version_dir = Path(version_dir)
    entry, version = version_dir.parent.name, version_dir.name
    info, spec = selective_metadata(version_dir / MODEL_FILENAME)
    points = info["operating_points"]
    p = len(points)
    label = model_label or entry.removesuffix(SELECTIVE_SUFFIX)
    ensemble = validate_model_name(entry + MONITORED_SUFFIX)
    counter = validate_model_name(f"abstain-decision-counter-{entry}")
    c, h, w = spec.shape
    coverage = [
        {
            "name": q["name"],
            "target_coverage": q["target_coverage"]
            if q["target_coverage"] is not None
            else q.get("coverage"),
        }
        for q in points
    ]
    params = {"model": label, "version": version, "operating_points": json.dumps(coverage)}
    parameters = "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}\n' for k, v in params.items()
    )
    counter_config = (
        f'name: "{counter}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "{ACCEPT_NAME}" data_type: TYPE_BOOL dims: [ {p} ] }} ]\n'
        f'output [ {{ name: "{ACCEPT_NAME}" data_type: TYPE_BOOL dims: [ {p} ] }} ]\n'
        f"{parameters}"
    )
    ensemble_config = (
        f'name: "{ensemble}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]\n'
        "output [\n"
        f'  {{ name: "{ACCEPT_NAME}" data_type: TYPE_BOOL dims: [ {p} ] }},\n'
        f'  {{ name: "{SCORES_NAME}" data_type: TYPE_FP64 dims: [ {p} ] }},\n'
        f'  {{ name: "{CLASS_INDEX_NAME}" data_type: TYPE_INT64 dims: [ 1 ] }}\n'
        "]\n"
        "ensemble_scheduling {\n"
        "  step [\n"
        f'    {{ model_name: "{entry}" model_version: {version}\n'
        f'      input_map {{ key: "{INPUT_NAME}" value: "{INPUT_NAME}" }}\n'
        f'      output_map {{ key: "{ACCEPT_NAME}" value: "uncounted_accept" }}\n'
        f'      output_map {{ key: "{SCORES_NAME}" value: "{SCORES_NAME}" }}\n'
        f'      output_map {{ key: "{CLASS_INDEX_NAME}" value: "{CLASS_INDEX_NAME}" }} }},\n'
        f'    {{ model_name: "{counter}" model_version: -1\n'
        f'      input_map {{ key: "{ACCEPT_NAME}" value: "uncounted_accept" }}\n'
        f'      output_map {{ key: "{ACCEPT_NAME}" value: "{ACCEPT_NAME}" }} }}\n'
        "  ]\n"
        "}\n"
    )
    repository = Path(repository)
    atomic_write_text(repository / counter / "config.pbtxt", counter_config)
    (repository / counter / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(COUNTER_MODEL, repository / counter / "1" / "model.py")
    atomic_write_text(repository / ensemble / "config.pbtxt", ensemble_config)
    (repository / ensemble / version).mkdir(parents=True, exist_ok=True)
    return ensemble


def triton_ensemble(
    version_dir: Annotated[
        Path,
        typer.Argument(
            help="Selective entry version (models/NAME-selective/1), as `abstain export-selective` wrote it."
        ),
    ],
    repository: Annotated[
        Path,
        typer.Option(help="Triton model repository to write into (where the selective entry is served)."),
    ] = Path("models"),
    model_label: Annotated[
        str | None,
        typer.Option(help="`model` label of the counters; default: the entry name without -selective."),
    ] = None,
) -> None:
    """Write a Triton ensemble NAME-monitored: the selective graph, then a Python-backend step
    counting decisions on Triton's /metrics with the service's metric names and labels
    (abstain_decisions_total, abstain_target_coverage), so deploy/'s rules and dashboard work."""
    from abstain.contract import resolve_version_dir

    name = write_monitored_ensemble(resolve_version_dir(version_dir), repository, model_label)
    typer.echo(f"wrote {Path(repository) / name} (serve it with its steps: --load-model {name})")
