"""The ``abstain`` command line: one program, one subcommand per stage.

Each stage keeps its command in ``<stage>/cli.py`` (``abstain.<stage>.cli``); those modules
import only typer and the standard library at the top, and import torch / onnxruntime /
bentoml inside the command body. The program imports a stage's command module only when
that subcommand runs (or when ``--help`` lists the commands), so ``abstain serve`` never
loads the training or calibration code, and ``abstain --help`` works without torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

#: subcommand → (module, function, whether it shows its help when run without arguments).
#: Listed in the order of the data flow: train → export → calibrate → evaluate → predict → serve.
STAGE_COMMANDS: dict[str, tuple[str, str, bool]] = {
    "train": ("abstain.training.cli", "train", False),
    "export": ("abstain.export.cli", "export", True),
    "import": ("abstain.export.cli", "import_model", True),
    "calibrate": ("abstain.calibration.cli", "calibrate", True),
    "evaluate": ("abstain.calibration.cli", "evaluate", True),
    "predict": ("abstain.calibration.cli", "predict", True),
    "serve": ("abstain.serving.cli", "serve", False),
    "review": ("abstain.serving.cli", "review", True),
    "export-selective": ("abstain.export.selective_entry", "export_selective", True),
    "triton-ensemble": ("abstain.serving.triton.ensemble", "triton_ensemble", True),
}


class LazyStageGroup(TyperGroup):
    """A click group whose subcommands are imported from their stage on first use."""

    # ctx is a click Context (typer >= 0.29 vendors click; not imported here so no click is needed)
    def list_commands(self, ctx: Any) -> list[str]:
        return list(STAGE_COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in STAGE_COMMANDS:
            return None
        module, function, no_args_is_help = STAGE_COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), function)
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
        single.command(name=cmd_name, no_args_is_help=no_args_is_help)(command)
        click_command = typer.main.get_command(single)
        click_command.name = cmd_name
        return click_command


def _print_version(value: bool) -> None:
    if value:
        from abstain import __version__
        from abstain.version import code_version

        # the second figure is what `train`, `export` and `calibrate` record as code_version
        typer.echo(f"abstain {__version__} (code version {code_version()})")
        raise typer.Exit()


app = typer.Typer(
    name="abstain",
    cls=LazyStageGroup,
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


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and the code version recorded in checkpoints, graphs and calibrations.",
    ),
) -> None:
    """Selective inference: predict or abstain."""


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
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)


def main() -> None:
    """Entry point of the ``abstain`` script."""
    try:
        app(args=join_multi_value_options(sys.argv[1:]), prog_name="abstain")
    except USER_ERRORS as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
