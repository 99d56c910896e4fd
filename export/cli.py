"""``abstain export``: a trained checkpoint → a verified ONNX graph in a Triton model repository.

Only typer and the standard library at the top: torch and onnx are imported when the
command runs, so ``abstain --help`` works without them (see ``abstain/cli.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt written by `abstain train`.")],
    name: Annotated[str, typer.Option(
        "--name", help="Entry name in the repository (letters, digits, '_', '.', '-'); also Triton's "
                       "model name.")],
    repository: Annotated[Path, typer.Option(
        help="Model repository root (Triton's layout).")] = Path("models"),
    version: Annotated[int | None, typer.Option(
        help="Version number to write; default: the next free one.")] = None,
    force: Annotated[bool, typer.Option(help="Replace --version if it already exists.")] = False,
    optimize: Annotated[bool, typer.Option(
        help="Save ONNX Runtime's offline graph optimisation (basic level: portable).")] = False,
    fp16: Annotated[bool, typer.Option(
        help="float16 weights and arithmetic (for GPUs) behind float32 inputs/outputs; verified at "
             "atol=rtol=1e-2.")] = False,
    max_batch_size: Annotated[int, typer.Option(help="Triton's max_batch_size in config.pbtxt.")] = 256,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export CHECKPOINT to REPOSITORY/NAME/<version>/model.onnx with config.pbtxt and labels.txt.

    The graph takes raw pixels float32 [N, C, H, W] in [0, 1] and returns logits [N, K] and
    selection [N]. Before anything is written it passes onnx.checker and matches PyTorch
    within 1e-4 (fp32) at batch sizes 1 and 64; a failed export leaves the repository unchanged.
    """
    from abstain.export.pipeline import describe, export_checkpoint, report_json

    result = export_checkpoint(checkpoint, name, repository, version=version, force=force,
                               optimize=optimize, fp16=fp16, max_batch_size=max_batch_size)
    typer.echo(report_json(result) if json_output else describe(result))


def _numbers(text: str | None, what: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` → floats (``None`` stays ``None``)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError as exc:
        raise ValueError(f"{what} should be comma-separated numbers, but got {text!r}") from exc


def import_model(
    source: Annotated[Path, typer.Argument(
        help="GRAPH.onnx; or, with the train extra, a TorchScript (.ts/.pt) or torch.export (.pt2) "
             "file, or a LOCAL weights file with --torchvision ARCH.")],
    name: Annotated[str, typer.Option("--name", help="Entry name in the repository.")],
    labels: Annotated[Path, typer.Option("--labels", help="Class names, one per line, in output order.")],
    input_spec: Annotated[str | None, typer.Option(
        "--input-spec", help="C,H,W of the image the classifier sees (default: the graph's input shape).",
    )] = None,
    mean: Annotated[str | None, typer.Option(
        "--mean", help="Per-channel mean the classifier expects (on [0, 1] pixels), e.g. 0.485,0.456,0.406.",
    )] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")] = None,
    logits: Annotated[str | None, typer.Option(
        "--logits", help="Output holding the class scores (default: the only float [N, K] output).",
    )] = None,
    probabilities: Annotated[bool, typer.Option(
        "--probabilities", help="That output holds probabilities, not logits.")] = False,
    torchvision: Annotated[str | None, typer.Option(
        "--torchvision", help="A torchvision classifier by name (e.g. resnet18); SOURCE is its local "
                              "state_dict. Never downloads.")] = None,
    repository: Annotated[Path, typer.Option(help="Model repository root.")] = Path("models"),
    version: Annotated[int | None, typer.Option(help="Version to write; default: the next free one.")] = None,
    force: Annotated[bool, typer.Option(help="Replace --version if it already exists.")] = False,
) -> None:
    """Wrap an existing classifier as a calibratable entry: pixels in [0, 1] → logits, selection.

    Example: abstain import lr.onnx --name digits-lr --labels labels.txt --input-spec 1,8,8 --probabilities
    """
    spec = _numbers(input_spec, "--input-spec")
    kwargs = dict(input_spec=None if spec is None else [int(v) for v in spec], mean=_numbers(mean, "--mean"),
                  std=_numbers(std, "--std"), version=version, force=force)
    if torchvision is None and source.suffix.lower() == ".onnx":
        from abstain.export.importer import describe, import_onnx

        result = import_onnx(source, name, labels, repository, logits_output=logits,
                             probabilities=probabilities, **kwargs)
    else:
        from abstain.export.importer import describe
        from abstain.export.torch_import import import_torch

        result = import_torch(source, name, labels, repository, torchvision=torchvision,
                              probabilities=probabilities, **kwargs)
    typer.echo(describe(result))
