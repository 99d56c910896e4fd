"""`abstain export CKPT1 CKPT2 …`: one graph of the members' mean softmax, checked against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from abstain.cli import app
from abstain.contract import META_CHECKPOINT_SHA256, MODEL_FILENAME
from abstain.io import sha256_file
from abstain.runtime import OnnxModel
from abstain.training.checkpoint import load_checkpoint, model_from_checkpoint
from tests.export.export_helpers import snapshot


def member_logits(path: Path, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model_from_checkpoint(load_checkpoint(path))(torch.from_numpy(x)).logits.double().numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ensemble_graph_is_the_log_of_the_mean_softmax(make_checkpoint, tmp_path: Path) -> None:
    a, b = make_checkpoint("a.pt", seed=0), make_checkpoint("b.pt", seed=1)
    repository = tmp_path / "models"
    result = CliRunner().invoke(
        app, ["export", str(a), str(b), "--name", "pair", "--repository", str(repository)]
    )
    assert result.exit_code == 0, result.output
    assert "an ensemble of 2 members" in result.output
    path = repository / "pair" / "1" / MODEL_FILENAME
    assert sorted(snapshot(repository)) == [
        "pair",
        "pair/1",
        "pair/1/model.onnx",
        "pair/config.pbtxt",
        "pair/labels.txt",
    ]

    x = np.random.default_rng(3).random((9, 1, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    logits, selection, selection_logit = session.run(None, {"pixels": x})
    mean = (softmax(member_logits(a, x)) + softmax(member_logits(b, x))) / 2  # [9, 10], numpy float64
    np.testing.assert_allclose(logits, np.log(mean), atol=1e-5)
    np.testing.assert_allclose(selection, mean.max(axis=1), atol=1e-6)
    sr = mean.max(axis=1)
    np.testing.assert_allclose(selection_logit, np.log(sr / (1 - sr)), atol=1e-4)
    assert not np.allclose(logits, np.log(softmax(member_logits(a, x))), atol=1e-3)  # not just member a

    served = OnnxModel(path, prefer_cuda=False)  # loads as any entry; metadata names both members
    assert served.metadata[META_CHECKPOINT_SHA256] == f'["{sha256_file(a)}", "{sha256_file(b)}"]'


def test_members_with_other_classes_are_refused_and_nothing_is_written(
    make_checkpoint, tmp_path: Path
) -> None:
    a, b = make_checkpoint("a.pt", seed=0), make_checkpoint("b.pt", seed=1, num_classes=5)
    repository = tmp_path / "models"
    from abstain.export.pipeline import export_ensemble

    with pytest.raises(ValueError, match="share the input spec and class names"):
        export_ensemble([a, b], "pair", repository)
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        export_ensemble([a], "pair", repository)
    assert snapshot(repository) == {}
