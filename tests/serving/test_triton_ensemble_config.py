"""``abstain triton-ensemble`` without a server: what it writes, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from abstain.contract import ACCEPT_NAME, TRITON_CONFIG_FILENAME
from abstain.serving.triton_ensemble import write_ensemble
from tests.serving.servers import REPO

SELECTIVE = REPO / "models" / "digits-selective"


def parse(path: Path) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)  # Triton's own schema: a typo fails here
    return config


def test_writes_graph_metrics_step_and_ensemble_with_the_service_labels(tmp_path: Path) -> None:
    name = write_ensemble(SELECTIVE, tmp_path)
    assert name == "digits-selective-monitored"
    assert (tmp_path / "digits-selective" / "1" / "model.onnx").is_file()
    metrics = parse(tmp_path / "digits-selective-metrics" / TRITON_CONFIG_FILENAME)
    assert metrics.backend == "python"
    assert [t.name for t in metrics.input] == [ACCEPT_NAME] == [t.name for t in metrics.output]
    assert list(metrics.input[0].dims) == [4]  # the 4 operating points of models/digits
    params = {k: v.string_value for k, v in metrics.parameters.items()}
    assert (params["model"], params["version"]) == ("digits", "1")
    points = json.loads(params["operating_points"])
    assert [p["name"] for p in points] == ["coverage-0.8", "coverage-0.9", "coverage-0.95", "risk-0.05"]
    assert points[0]["target_coverage"] == 0.8
    ensemble = parse(tmp_path / name / TRITON_CONFIG_FILENAME)
    assert ensemble.platform == "ensemble"
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["digits-selective", "digits-selective-metrics"]
    # accept reaches the client only through the metrics step, so every answer is counted
    assert dict(steps[1].output_map) == {ACCEPT_NAME: ACCEPT_NAME}
    assert ACCEPT_NAME not in dict(steps[0].output_map).values()
    assert (tmp_path / name / "1").is_dir()


def test_labels_can_be_overridden(tmp_path: Path) -> None:
    write_ensemble(SELECTIVE / "1", tmp_path, model="digits-prod", model_version="7")
    params = parse(tmp_path / "digits-selective-metrics" / TRITON_CONFIG_FILENAME).parameters
    assert (params["model"].string_value, params["version"].string_value) == ("digits-prod", "7")


def test_a_plain_graph_is_refused_with_the_command_that_makes_a_selective_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="abstain export-selective"):
        write_ensemble(REPO / "models" / "digits", tmp_path)
