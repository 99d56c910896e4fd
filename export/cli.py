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


def export_selective(
    model_dir: Annotated[Path, typer.Argument(
        help="A calibrated model: models/NAME (latest version) or models/NAME/VERSION with "
             "model.onnx and calibration.json.")],
    name: Annotated[str | None, typer.Option(
        "--name", help="Entry name; default: <NAME>-selective.")] = None,
    repository: Annotated[Path | None, typer.Option(
        help="Model repository root; default: the one MODEL_DIR is in.")] = None,
    version: Annotated[int | None, typer.Option(
        help="Version to write; default: the base model's version.")] = None,
    force: Annotated[bool, typer.Option(help="Replace --version if it already exists.")] = False,
    max_batch_size: Annotated[int, typer.Option(help="Triton's max_batch_size in config.pbtxt.")] = 256,
) -> None:
    """Bake MODEL_DIR's calibrated decision into a new graph: REPOSITORY/NAME/<version>/model.onnx.

    Outputs: the original logits and selection, plus class_index int64 [N], confidence
    (softmax response) float64 [N], scores float64 [N, P] and accept bool [N, P] for the P
    operating points of calibration.json (order and thresholds in the graph's
    "abstain.selective" metadata, with the sha256 of the base graph and of the calibration).
    accept equals `abstain serve`'s decision (score >= threshold in float64). Deterministic:
    the same inputs give the same bytes.
    """
    from abstain.export.selective import export_selective as run

    result = run(model_dir, name=name, repository=repository, version=version, force=force,
                 max_batch_size=max_batch_size)
    typer.echo(
        f"wrote {result.model_path} (entry {result.name}, version {result.version}); operating points "
        f"{', '.join(result.operating_points)}; base graph sha256 {result.base_sha256[:12]}…, "
        f"calibration sha256 {result.calibration_sha256[:12]}…"
    )
