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

#: Options of ``abstain calibrate`` that take several numbers: ``--coverage 0.8 0.9 0.95``.
MULTI_VALUE_OPTIONS = ("--coverage", "--risk")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def join_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite ``calibrate … --coverage 0.8 0.9 0.95`` as ``--coverage 0.8,0.9,0.95``.

    Click options take one value each; the calibrate command already accepts comma-separated
    and repeated values, so the space-separated form users write is joined here. Only the
    numbers directly after the option are joined; anything else is left for click to parse.
    """
    if "calibrate" not in argv:
        return list(argv)
    joined: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        joined.append(token)
        i += 1
        if token in MULTI_VALUE_OPTIONS:
            values = []
            while i < len(argv) and _is_number(argv[i]):
                values.append(argv[i])
                i += 1
            if values:
                joined.append(",".join(values))
    return joined


#: Failures a user can cause: reported as one line, exit status 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)


def main() -> None:
    """Entry point of the ``abstain`` script."""
    try:
        app(args=join_multi_value_options(sys.argv[1:]), prog_name="abstain")
    except USER_ERRORS as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
