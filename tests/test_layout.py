"""The dependency directions of DESIGN.md, checked on the source and on a real interpreter.

* ``abstain/`` imports numpy (and scikit-learn lazily), never torch or a serving library.
* ``serving/`` never imports torch, so the serving image stays a few hundred MB.
* ``abstain --help`` and the serving modules load without importing torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Top-level package names imported anywhere in a Python file (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files found in {package}/"
    return files


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("abstain", {"torch", "torchvision", "bentoml", "onnxruntime", "tritonclient", "training", "export"}),
        ("serving", {"torch", "torchvision", "training", "export"}),
    ],
)
def test_package_never_imports_forbidden_modules(package: str, forbidden: set[str]) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & forbidden)
        for path in python_files(package)
        if imported_modules(path) & forbidden
    }
    # abstain/cli.py is the one place allowed to import the stages' *command modules*,
    # which themselves keep heavy imports inside function bodies (checked below at run time).
    offenders.pop("abstain/cli.py", None)
    assert not offenders, f"{package}/ must not import {sorted(forbidden)}: {offenders}"


def test_import_checker_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy\n\ndef f():\n    from torch import nn\n    import onnx.helper\n")
    assert imported_modules(sample) == {"numpy", "torch", "onnx"}


@pytest.mark.parametrize(
    "statement",
    [
        "import abstain.cli",
        "import abstain.selective, abstain.calibration, abstain.datasets",
        "import serving.inference, serving.cli, serving.offline_cli",
    ],
)
def test_modules_load_without_torch(statement: str) -> None:
    code = f"import sys; {statement}; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"{statement!r} imported torch"


def test_cli_help_lists_every_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "abstain", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("train", "export", "calibrate", "evaluate", "serve"):
        assert command in result.stdout


def test_ruff_is_clean() -> None:
    """The lint configuration in pyproject.toml holds for the whole tree (ruff is in the dev extra)."""
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
