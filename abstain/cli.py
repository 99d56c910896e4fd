"""The ``abstain`` command line: one program, one subcommand per stage.

Each stage keeps its command in ``<stage>/cli.py``; those modules import only typer and the
standard library at the top, and import torch / onnxruntime / bentoml inside the command
body, so ``abstain --help`` and the serving commands work without torch installed.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from export.cli import export
from serving.cli import serve
from serving.offline_cli import calibrate, evaluate
from training.cli import train

app = typer.Typer(
    name="abstain",
    help=(
        "Selective inference: train a classifier that may abstain (SelectiveNet + SYNC loss), "
        "export it to ONNX, calibrate its threshold on held-out data, and serve it over HTTP.\n\n"
        "Typical flow: abstain train → abstain export → abstain calibrate → abstain evaluate "
        "→ abstain serve."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command(no_args_is_help=False)(train)
app.command(no_args_is_help=True)(export)
app.command(no_args_is_help=True)(calibrate)
app.command(no_args_is_help=True)(evaluate)
app.command()(serve)

#: Failures a user can cause: reported as one line, exit status 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)


def main() -> None:
    """Entry point of the ``abstain`` script."""
    try:
        app()
    except USER_ERRORS as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
