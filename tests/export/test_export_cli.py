"""`abstain export` end to end, and every user error leaving the repository untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import abstain.export.pipeline as pipeline
from abstain.cli import app
from abstain.contract import META_CHECKPOINT_SHA256, META_TEST_METRICS, MODEL_FILENAME
from abstain.export.onnx_export import export_graph
from abstain.export.verify import ParityError
from abstain.io import sha256_file
from abstain.runtime import OnnxModel
from abstain.training.checkpoint import model_from_checkpoint, save_checkpoint
from tests.export.export_helpers import checkpoint_dict, snapshot

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory):
    """One real export, shared by the module (an export costs seconds on 2 cores)."""
    root = tmp_path_factory.mktemp("exported")
    checkpoint = root / "checkpoint.pt"
    save_checkpoint(checkpoint, checkpoint_dict())
    repository = root / "models"
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--name", "digits", "--repository", str(repository)]
    )
    assert result.exit_code == 0, result.output
    return checkpoint, repository, result.output


@pytest.fixture
def exported(exported_once, tmp_path):
    """A private copy of the exported repository (models/digits/1) and the checkpoint."""
    checkpoint, repository, output = exported_once
    copy = tmp_path / "models"
    shutil.copytree(repository, copy)
    return checkpoint, copy, output.replace(str(repository), str(copy))


def test_export_writes_a_servable_entry_and_reports_parity(exported):
    checkpoint, repository, output = exported
    path = repository / "digits" / "1" / MODEL_FILENAME
    assert f"wrote {path} (version 1" in output
    assert "at batch sizes 1, 64" in output and "tolerance atol=0.0001" in output
    served = OnnxModel(path, prefer_cuda=False)
    assert served.metadata[META_CHECKPOINT_SHA256] == sha256_file(checkpoint)
    assert sorted(snapshot(repository)) == [
        "digits",
        "digits/1",
        "digits/1/model.onnx",
        "digits/config.pbtxt",
        "digits/labels.txt",
    ]


def test_second_export_is_the_next_version_and_json_report(exported):
    checkpoint, repository, _ = exported
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--name", "digits", "--repository", str(repository), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["version"] == 2 and report["replaced"] is False
    assert report["sha256"] == sha256_file(repository / "digits" / "2" / MODEL_FILENAME)
    assert report["parity"]["max_abs_logits"] <= 1e-4 and report["parity"]["batch_sizes"] == [1, 64]


def _invoke_failing(args):
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code != 0
    return result.exception


def test_corrupted_checkpoint_is_refused_and_repository_unchanged(exported, tmp_path):
    checkpoint, repository, _ = exported
    before = snapshot(repository)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:5000])  # a truncated copy
    error = _invoke_failing([str(broken), "--name", "digits", "--repository", str(repository)])
    assert isinstance(error, ValueError) and "is not a readable abstain checkpoint" in str(error)
    error = _invoke_failing(
        [str(tmp_path / "missing.pt"), "--name", "digits", "--repository", str(repository)]
    )
    assert isinstance(error, FileNotFoundError) and "does not exist" in str(error)
    assert snapshot(repository) == before


def test_foreign_checkpoint_exits_2_with_one_line_error(exported, tmp_path):
    _, repository, _ = exported
    before = snapshot(repository)
    foreign = tmp_path / "state_dict.pt"
    torch.save(model_from_checkpoint(checkpoint_dict()).state_dict(), foreign)  # a plain state_dict
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "export",
            str(foreign),
            "--name",
            "digits",
            "--repository",
            str(repository),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "is not an abstain checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(repository) == before


@pytest.mark.parametrize("name", ["../x", "a/b"])
def test_path_like_name_is_refused(exported, name):
    checkpoint, repository, _ = exported
    before = snapshot(repository.parent)
    error = _invoke_failing([str(checkpoint), "--name", name, "--repository", str(repository)])
    assert isinstance(error, ValueError) and "model name should be" in str(error)
    assert snapshot(repository.parent) == before


def test_unwritable_repository_is_refused(exported, tmp_path):
    checkpoint, _, _ = exported
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    error = _invoke_failing([str(checkpoint), "--name", "digits", "--repository", str(blocker / "models")])
    assert isinstance(error, NotADirectoryError) and "is a file, not a directory" in str(error)
    assert blocker.read_text() == "not a directory"


def test_existing_version_without_force_is_refused_and_force_replaces(exported):
    checkpoint, repository, _ = exported
    before = snapshot(repository)
    error = _invoke_failing(
        [str(checkpoint), "--name", "digits", "--repository", str(repository), "--version", "1"]
    )
    assert isinstance(error, FileExistsError) and "--force" in str(error)
    assert snapshot(repository) == before
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(checkpoint),
            "--name",
            "digits",
            "--repository",
            str(repository),
            "--version",
            "1",
            "--force",
            "--optimize",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "version 1, replaced" in result.output
    after = snapshot(repository)
    assert sorted(after) == sorted(before) and after["digits/1/model.onnx"] != before["digits/1/model.onnx"]
    assert after["digits/config.pbtxt"] == before["digits/config.pbtxt"]


def test_failed_parity_check_fails_the_export_and_writes_nothing(exported, monkeypatch):
    checkpoint, repository, _ = exported
    before = snapshot(repository)
    other = model_from_checkpoint(checkpoint_dict(seed=1))  # same shapes, different weights

    def export_the_wrong_model(model, spec, fp16=False):
        return export_graph(other, spec, fp16)

    monkeypatch.setattr(pipeline, "export_graph", export_the_wrong_model)
    error = _invoke_failing([str(checkpoint), "--name", "digits", "--repository", str(repository)])
    assert isinstance(error, ParityError)
    assert "ONNX Runtime and PyTorch disagree" in str(error) and "max abs diff" in str(error)
    assert snapshot(repository) == before


def test_metrics_of_an_interrupted_run_are_not_exported_as_test_metrics(tmp_path):
    # A run stopped before its test evaluation leaves the last epoch's val record in the
    # checkpoint: it must not be published as abstain.test_metrics.
    val_record = {"split": "val", "epoch": 2, "accuracy": 0.91}
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, dict(checkpoint_dict(), metrics=val_record, epoch=2))
    repository = tmp_path / "models"
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--name", "digits", "--repository", str(repository)]
    )
    assert result.exit_code == 0, result.output
    assert (
        "note: the checkpoint holds no test metrics, only the val metrics of epoch 2 (the run "
        "stopped before its test evaluation): stored as abstain.val_metrics, not abstain.test_metrics"
    ) in " ".join(result.output.split())
    metadata = OnnxModel(repository / "digits" / "1" / MODEL_FILENAME, prefer_cuda=False).metadata
    assert META_TEST_METRICS not in metadata
    assert json.loads(metadata["abstain.val_metrics"]) == val_record

    as_json = CliRunner().invoke(
        app, ["export", str(checkpoint), "--name", "digits", "--json", "--repository", str(repository)]
    )
    report = json.loads(as_json.output)
    assert report["metrics_key"] == "abstain.val_metrics" and len(report["notes"]) == 1


@pytest.mark.parametrize(
    ("metrics", "key", "note"),
    [
        ({"split": "test", "accuracy": 0.97}, META_TEST_METRICS, None),
        ({"split": "val", "epoch": 5}, "abstain.val_metrics", "only the val metrics of epoch 5"),
        ({"accuracy": 0.97}, None, "name no split"),
        ({"split": "../../x"}, None, "name no split"),
        (None, None, None),
    ],
)
def test_metrics_go_under_the_key_of_their_split(metrics, key, note):
    got_key, got_note = pipeline.metrics_metadata(dict(checkpoint_dict(), metrics=metrics))
    assert got_key == key
    assert (got_note is None) if note is None else (note in got_note)
    meta = pipeline.graph_metadata(
        dict(checkpoint_dict(), metrics=metrics),
        "ab" * 32,
        *pipeline._consistent_spec(checkpoint_dict(), Path("c")),
        False,
        False,
    )
    assert {k for k in meta if k.endswith("_metrics")} == ({key} if key else set())
