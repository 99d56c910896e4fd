"""``abstain export-selective``: a calibrated version directory → a selective-graph entry.

``models/digits/1`` (``model.onnx`` + ``calibration.json``) becomes ``models/digits-selective/1``
whose graph returns the decision for every operating point (``export/selective_graph.py``),
with ``config.pbtxt`` and ``labels.txt`` like any entry, written all-or-nothing through
``export/repository.py``. The output is deterministic (no timestamp, no code version of its
own), so re-running the command on the same inputs writes the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

#: Triton data types of the ONNX element types a selective graph outputs.
_TRITON_DTYPES = {1: "TYPE_FP32", 11: "TYPE_FP64", 7: "TYPE_INT64", 9: "TYPE_BOOL"}


@dataclass(frozen=True)
class SelectiveResult:
    """What :func:`export_selective_entry` wrote."""

    model_path: Path
    base_path: Path
    calibration_path: Path
    operating_points: tuple[str, ...]
    sha256: str


def render_selective_config(name: str, model: Any, max_batch_size: int) -> str:
    """Triton ``config.pbtxt`` for ``model``: every input and output with its dims.

    Dims exclude the batch dimension. A per-item scalar (``[N]`` in the graph) is declared
    ``[1]`` with ``reshape { shape: [ ] }``, as ``export/repository.py`` does for ``selection``.
    ``labels.txt`` is attached to ``logits``.
    """
    from abstain.contract import LABELS_FILENAME, LOGITS_NAME, validate_model_name

    def tensor(value_info: Any, labels: bool) -> str:
        t = value_info.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim[1:]]
        if t.elem_type not in _TRITON_DTYPES or any(d < 1 for d in dims):
            raise ValueError(f"tensor {value_info.name!r} has a type or shape Triton config cannot state")
        lines = [f'    name: "{value_info.name}"', f"    data_type: {_TRITON_DTYPES[t.elem_type]}"]
        if dims:
            lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
        else:
            lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        if labels:
            lines.append(f'    label_filename: "{LABELS_FILENAME}"')
        return "  {\n" + "\n".join(lines) + "\n  }"

    inputs = ",\n".join(tensor(v, False) for v in model.graph.input)
    outputs = ",\n".join(tensor(v, v.name == LOGITS_NAME) for v in model.graph.output)
    from abstain.export.repository import MAX_QUEUE_DELAY_US

    return (
        f'name: "{validate_model_name(name)}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n"
        "}\n"
    )


def build_from_version_dir(version_dir: Path) -> tuple[Any, list[str]]:
    """The selective ``ModelProto`` and the class names for a calibrated version directory.

    Raises ``FileNotFoundError`` without ``calibration.json`` and ``CalibrationError`` when the
    calibration belongs to another graph (its ``graph_sha256`` differs).
    """
    import onnx

    from abstain.contract import CALIBRATION_FILENAME, META_CLASS_NAMES, MODEL_FILENAME
    from abstain.export.selective_graph import SelectiveInfo, build_selective_model, point_records
    from abstain.io import sha256_file
    from abstain.operating_points import load_calibration, verify_graph

    base_path = version_dir / MODEL_FILENAME
    calibration_path = version_dir / CALIBRATION_FILENAME
    if not calibration_path.is_file():
        raise FileNotFoundError(
            f"{calibration_path} not found: calibrate the graph first (`abstain calibrate {version_dir}`)"
        )
    calibration = load_calibration(calibration_path)
    base_sha = verify_graph(calibration, base_path)
    base = onnx.load(str(base_path))
    props = {p.key: p.value for p in base.metadata_props}
    class_names = json.loads(props[META_CLASS_NAMES])
    info = SelectiveInfo(
        base_sha,
        sha256_file(calibration_path),
        calibration.default_operating_point,
        point_records(calibration),
    )
    return build_selective_model(base, calibration, info), class_names


def export_selective_entry(
    model_dir: Path,
    name: str | None = None,
    repository: Path | None = None,
    version: int | None = None,
    force: bool = False,
    max_batch_size: int = 256,
) -> SelectiveResult:
    """Write ``REPOSITORY/NAME/VERSION/model.onnx`` (+ config, labels) for ``model_dir``.

    Defaults: ``NAME`` = ``<base name>-selective``, ``REPOSITORY`` = the base entry's repository,
    ``VERSION`` = the base version (so ``digits/1`` → ``digits-selective/1``).
    """
    import onnxruntime as ort

    from abstain.contract import SELECTIVE_SUFFIX, resolve_version_dir
    from abstain.export.repository import commit_entry, plan_entry
    from abstain.io import sha256_bytes

    version_dir = resolve_version_dir(Path(model_dir))
    model, class_names = build_from_version_dir(version_dir)
    entry = version_dir.parent
    name = name or entry.name + SELECTIVE_SUFFIX
    repository = Path(repository) if repository is not None else entry.parent
    version = version if version is not None else int(version_dir.name)
    config_text = render_selective_config(name, model, max_batch_size)
    plan = plan_entry(repository, name, class_names, config_text, version=version, force=force)
    data = model.SerializeToString()
    # load it once in ONNX Runtime before writing: a graph ORT rejects never reaches the repository
    ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    path = commit_entry(plan, data, config_text, class_names)
    from abstain.export.selective_graph import SelectiveInfo

    points = tuple(p["name"] for p in SelectiveInfo.from_model(model).operating_points)
    return SelectiveResult(
        path, version_dir / "model.onnx", version_dir / "calibration.json", points, sha256_bytes(data)
    )


def export_selective(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Calibrated entry (models/NAME, latest version) or version directory (models/NAME/3)."
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Entry name to write; default: <base name>-selective.")
    ] = None,
    repository: Annotated[
        Path | None, typer.Option(help="Model repository to write into; default: the base entry's.")
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="Version to write; default: the base graph's version.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace the version if it already exists.")] = False,
    max_batch_size: Annotated[int, typer.Option(help="Triton's max_batch_size in config.pbtxt.")] = 256,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Bake the calibrated decision into the graph: a model-repository entry any ONNX runtime serves.

    Outputs: the base graph's (logits, selection), plus class_index int64 [N], confidence
    float64 [N], scores float64 [N, P] and accept bool [N, P] for the P operating points of
    calibration.json, in its order (listed in the graph's abstain.selective metadata with the
    sha256 of the base graph and of the calibration). accept[:, p] equals `abstain serve`'s
    decision with operating point p.
    """
    try:
        result = export_selective_entry(model_dir, name, repository, version, force, max_batch_size)
    except (FileNotFoundError, FileExistsError, ValueError, PermissionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "model": str(result.model_path),
                    "base": str(result.base_path),
                    "calibration": str(result.calibration_path),
                    "operating_points": list(result.operating_points),
                    "sha256": result.sha256,
                }
            )
        )
    else:
        typer.echo(
            f"wrote {result.model_path} (operating points: {', '.join(result.operating_points)}; "
            f"from {result.base_path} + {result.calibration_path})"
        )
