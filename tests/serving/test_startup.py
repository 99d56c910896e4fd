"""Start-up refusal (missing / malformed / foreign calibration) and the no-torch rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.servers import REPO, bentoml_command, free_port, service_env


def _break(version_dir: Path, how: str) -> None:
    cal = version_dir / "calibration.json"
    if how == "missing":
        cal.unlink()
    elif how == "malformed":
        cal.write_text('{"schema_version": 1, "graph_sha256": ')
    elif how == "foreign":
        data = json.loads(cal.read_text())
        data["graph_sha256"] = "0" * 64
        cal.write_text(json.dumps(data))


EXPECTED = {
    "missing": "is missing",
    "malformed": "not valid JSON",
    "foreign": "calibration is for another graph",
}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_abstain_serve_refuses_bad_calibration(model_copy: Path, how: str) -> None:
    _break(model_copy, how)
    result = subprocess.run(
        [sys.executable, "-m", "abstain", "serve", str(model_copy.parent)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert EXPECTED[how] in result.stderr  # what is wrong
    assert "abstain calibrate" in result.stderr  # and how to fix it


def test_abstain_serve_refuses_unknown_operating_point(model_copy: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "abstain", "serve", str(model_copy), "--operating-point", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert (
        result.returncode == 2
        and "unknown operating point 'x'" in result.stderr
        and "valid:" in result.stderr
    )


@pytest.mark.server
def test_bentoml_serve_directly_exits_on_a_foreign_calibration(model_copy: Path) -> None:
    _break(model_copy, "foreign")
    result = subprocess.run(
        bentoml_command(free_port()),
        env=service_env(model_dir=model_copy),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "calibration is for another graph" in result.stderr
    assert "re-run `abstain calibrate`" in result.stderr


def test_serving_never_imports_torch() -> None:
    code = (
        "import sys, serving.service, serving.cli, serving.backends, serving.triton_repository; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=service_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
