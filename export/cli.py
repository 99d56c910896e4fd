"""``abstain export``: a trained checkpoint → a verified ONNX graph in a Triton model repository.

Only typer and the standard library at the top: torch and onnx are imported when the
command runs, so ``abstain --help`` works without them (see ``abstain/cli.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="checkpoint.pt written by `abstain train`; two or more: one graph of their deep "
            "ensemble (mean softmax).",
            metavar="CHECKPOINT",
        ),
    ],
    name: Annotated[
        str,
        typer.Option(
            "--name",
            help="Entry name in the repository (letters, digits, '_', '.', '-'); also Triton's model name.",
        ),
    ],
    repository: Annotated[Path, typer.Option(help="Model repository root (Triton's layout).")] = Path(
        "models"
    ),
    version: Annotated[
        int | None, typer.Option(help="Version number to write; default: the next free one.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace --version if it already exists.")] = False,
    optimize: Annotated[
        bool, typer.Option(help="Save ONNX Runtime's offline graph optimisation (basic level: portable).")
    ] = False,
    fp16: Annotated[
        bool,
        typer.Option(
            help="float16 weights and arithmetic (for GPUs) behind float32 inputs/outputs; verified at "
            "atol=rtol=1e-2."
        ),
    ] = False,
    max_batch_size: Annotated[int, typer.Option(help="Triton's max_batch_size in config.pbtxt.")] = 256,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export CHECKPOINT to REPOSITORY/NAME/<version>/model.onnx with config.pbtxt and labels.txt.

    The graph takes raw pixels float32 [N, C, H, W] in [0, 1] and returns logits [N, K] and
    selection [N]. Before anything is written it passes onnx.checker and matches PyTorch
    within 1e-4 (fp32) at batch sizes 1 and 64; a failed export leaves the repository unchanged.
    Several checkpoints: one graph whose logits are the log of the members' mean softmax and
    whose selection is its softmax response (a deep ensemble).
    """
    from abstain.export.pipeline import describe, export_checkpoint, export_ensemble, report_json

    if len(checkpoints) > 1:
        if fp16:
            raise ValueError("--fp16 is not available for an ensemble export; export it in fp32")
        result = export_ensemble(
            checkpoints,
            name,
            repository,
            version=version,
            force=force,
            optimize=optimize,
            max_batch_size=max_batch_size,
        )
    else:
        result = export_checkpoint(
            checkpoints[0],
            name,
            repository,
            version=version,
            force=force,
            optimize=optimize,
            fp16=fp16,
            max_batch_size=max_batch_size,
        )
    typer.echo(report_json(result) if json_output else describe(result))


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise ValueError(
            f"{option} should be numbers, one per channel (e.g. 0.485,0.456,0.406), but got {text!r}"
        ) from None


def import_model(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="The classifier: an .onnx graph, a TorchScript file, or a torch.export .pt2 program "
            "(omit with --torchvision)."
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Entry name in the repository.")] = "",
    labels: Annotated[
        Path,
        typer.Option(
            "--labels",
            help="Class names, one per line, in the order of the output's columns.",
        ),
    ] = Path("labels.txt"),
    input_spec: Annotated[
        str | None,
        typer.Option(
            "--input-spec",
            help="C,H,W of the images (needed unless the graph's input is [N, C, H, W]).",
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option("--mean", help="Per-channel mean the classifier expects, e.g. 0.485,0.456,0.406."),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option("--std", help="Per-channel std the classifier expects, e.g. 0.229,0.224,0.225."),
    ] = None,
    logits: Annotated[
        str | None,
        typer.Option("--logits", help="The output that holds the class scores (default: the first)."),
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="That output is probabilities, not logits.")
    ] = False,
    torchvision_name: Annotated[
        str | None,
        typer.Option(
            "--torchvision", help="A torchvision classifier by name (e.g. resnet18), with --weights."
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="Local state-dict file for --torchvision (nothing is downloaded)."),
    ] = None,
    repository: Annotated[Path, typer.Option(help="Model repository root (Triton's layout).")] = Path(
        "models"
    ),
    version: Annotated[int | None, typer.Option(help="Version number; default: the next free one.")] = None,
    force: Annotated[bool, typer.Option(help="Replace --version if it already exists.")] = False,
) -> None:
    """Wrap a classifier you already have into a model-repository entry that abstain can calibrate and serve.

    The entry takes pixels in [0, 1] (your --mean/--std folded into the graph) and outputs logits
    and, as its selection score, the softmax response. Example:
    abstain import lr.onnx --name digits-lr --labels labels.txt --input-spec 1,8,8
    --logits probabilities --probabilities
    """
    from abstain.export.importer import import_onnx, parse_input_spec, read_label_file, torch_to_onnx

    if not name:
        raise ValueError("--name is required: the entry's name in the repository")
    names = read_label_file(labels)
    mean_values, std_values = _floats(mean, "--mean"), _floats(std, "--std")
    graph: Path | bytes
    source = None
    if model is not None and model.suffix == ".onnx" and torchvision_name is None:
        graph = model
    else:
        spec = parse_input_spec(input_spec, mean_values, std_values, [])
        graph, source = torch_to_onnx(model, spec, torchvision_name=torchvision_name, weights=weights)
    result = import_onnx(
        graph,
        name,
        names,
        repository,
        input_spec=input_spec,
        mean=mean_values,
        std=std_values,
        logits_output=logits,
        probabilities=probabilities,
        version=version,
        force=force,
        source=source,
    )
    typer.echo(
        f"wrote {result.model_path} (version {result.version}{', replaced' if result.replaced else ''}, "
        f"{result.num_classes} classes, sha256 {result.sha256})\n"
        f"checked against the original on random inputs: max |Δ| = {result.max_abs_diff:.2e}\n"
        f"next: abstain calibrate {result.model_path.parent.parent} --data HELD_OUT.npz"
    )
