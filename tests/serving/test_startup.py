"""Start-up refusal (missing / malformed / foreign calibration) and the no-torch rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abstain.io import sha256_file
from abstain.operating_points import CalibrationError
from abstain.runtime import OnnxModel
from abstain.serving.inference.artifacts import load_artifacts, load_graph
from tests.graph_factory import write_graph
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
def test_bentoml_serve_directly_exits_on_a_foreign_calibration(model_copy: Path, tmp_path: Path) -> None:
    _break(model_copy, "foreign")
    result = subprocess.run(
        bentoml_command(free_port()),
        env=service_env(tmp_path / "bentoml", model_dir=model_copy),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "calibration is for another graph" in result.stderr
    assert "re-run `abstain calibrate`" in result.stderr


def test_serving_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys, abstain.serving.service, abstain.serving.cli, abstain.serving.inference.backends, "
        "tests.serving.triton_repository; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=service_env(tmp_path / "bentoml"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_onnx_model_hash_names_the_bytes_it_loaded(model_copy: Path, tmp_path: Path) -> None:
    graph = model_copy / "model.onnx"
    original = sha256_file(graph)
    model = OnnxModel(graph, intra_op_threads=1, prefer_cuda=False)
    write_graph(graph)  # `abstain export --force` replaces the file after it was loaded
    assert sha256_file(graph) != original
    assert model.sha256 == original  # still the graph that runs, not the file now on disk
    from_bytes = OnnxModel(graph.read_bytes(), intra_op_threads=1, prefer_cuda=False, path=graph)
    assert from_bytes.sha256 == sha256_file(graph) and from_bytes.path == graph


def test_worker_refuses_a_graph_changed_after_the_start_up_check(model_copy: Path) -> None:
    artifacts = load_artifacts(model_copy)  # the import-time check: graph and calibration agree
    assert load_graph(artifacts, intra_op_threads=1, prefer_cuda=False).sha256 == artifacts.graph_sha256
    write_graph(model_copy / "model.onnx")  # replaced before a worker loads it
    with pytest.raises(CalibrationError, match=r"calibration is for another graph.*changed on disk"):
        load_graph(artifacts, intra_op_threads=1, prefer_cuda=False)
