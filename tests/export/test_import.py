"""``abstain import``: classifiers made elsewhere become contract entries that calibrate,
evaluate, predict offline and serve (a real ``bentoml serve``) unchanged.

Two outside classifiers: scikit-learn's logistic regression on digits (skl2onnx, outputs
probabilities) and torchvision's resnet18 with random weights (logits, ImageNet normalisation).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from abstain.calibration.calibrate import run_calibration
from abstain.calibration.evaluate import run_evaluation
from abstain.calibration.predict import run_predict
from abstain.contract import META_IMPORT
from abstain.datasets import load_digits
from abstain.export.importer import import_onnx
from abstain.export.torch_import import import_torch
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel
from abstain.serving.decisions import decide
from tests.serving.servers import REPO, bentoml_command, free_port, service_env, stop, wait_ready

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def sklearn_lr(tmp_path_factory: pytest.TempPathFactory):
    """(classifier, lr.onnx, labels.txt): LR fitted on digits train, converted by skl2onnx."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    tmp = tmp_path_factory.mktemp("lr")
    train = load_digits("train")
    clf = LogisticRegression(max_iter=2000).fit(train.x.reshape(len(train.x), -1), train.y)
    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset=17,
    )
    (tmp / "lr.onnx").write_bytes(onx.SerializeToString())
    (tmp / "labels.txt").write_text("\n".join(train.class_names) + "\n")
    return clf, tmp / "lr.onnx", tmp / "labels.txt"


@pytest.fixture(scope="module")
def lr_entry(sklearn_lr, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LR imported and calibrated on digits val; its version directory."""
    _, graph, labels = sklearn_lr
    result = import_onnx(
        graph,
        "digits-lr",
        labels,
        tmp_path_factory.mktemp("repo"),
        input_spec=(1, 8, 8),
        logits_output="probabilities",
        probabilities=True,
    )
    run_calibration(
        result.model_path.parent, dataset="digits", split="val", coverages=[0.8, 0.9], risks=[0.05]
    )
    return result.model_path.parent


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory):
    """(module, version dir): torchvision resnet18, random weights, imported from a local
    state_dict by name, calibrated on random labelled pixels (coverage points only)."""
    import torchvision

    tmp = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    module = torchvision.models.get_model("resnet18", weights=None, num_classes=4).eval()
    torch.save(module.state_dict(), tmp / "resnet18.pt")
    (tmp / "labels.txt").write_text("cat\ndog\nfox\nowl\n")
    result = import_torch(
        tmp / "resnet18.pt",
        "r18",
        tmp / "labels.txt",
        tmp / "models",
        torchvision="resnet18",
        input_spec=(3, 32, 32),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    rng = np.random.default_rng(0)
    np.savez(tmp / "val.npz", x=rng.random((200, 3, 32, 32), dtype=np.float32), y=rng.integers(0, 4, 200))
    run_calibration(result.model_path.parent, data=tmp / "val.npz", coverages=[0.5, 0.9], risks=[])
    return module, result.model_path.parent


def test_lr_graph_is_the_classifier_behind_the_contract(sklearn_lr, lr_entry: Path) -> None:
    clf, _, _ = sklearn_lr
    model = OnnxModel(lr_entry / "model.onnx")  # the contract check of calibrate and serve
    test = load_digits("test")
    out = model.run(test.x)
    probs = clf.predict_proba(test.x.reshape(len(test.x), -1))
    z = np.exp(out.logits - out.logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(z / z.sum(axis=1, keepdims=True), probs, atol=1e-5)
    np.testing.assert_allclose(out.selection, probs.max(axis=1), atol=1e-5)  # the softmax response
    meta = json.loads(model.metadata[META_IMPORT])
    assert meta["file"] == "lr.onnx" and meta["probabilities"] is True
    assert meta["scores_output"] == "probabilities" and meta["input_shape"][1] == 64
    assert model.input_spec.shape == (1, 8, 8) and model.class_names == [str(i) for i in range(10)]


def test_lr_evaluates_and_predicts_like_the_service(lr_entry: Path, tmp_path: Path) -> None:
    report = run_evaluation(lr_entry, tmp_path / "eval", dataset="digits", split="test").report
    assert {p["name"] for p in report["operating_points"]} == {"coverage-0.8", "coverage-0.9", "risk-0.05"}
    run_predict(lr_entry, tmp_path / "d.jsonl", dataset="digits", split="test")
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    model = OnnxModel(lr_entry / "model.onnx")
    out = model.run(load_digits("test").x)
    point = load_calibration(lr_entry / "calibration.json").operating_point(None)
    expected = decide(out.logits, out.selection, point, model.class_names)
    assert [r["decision"] for r in records] == [e["decision"] for e in expected]
    assert [r["class_index"] for r in records] == [
        e.get("class_index", e.get("candidate", {}).get("class_index")) for e in expected
    ]


def test_resnet_matches_torch_and_predicts(resnet, tmp_path: Path) -> None:
    module, version = resnet
    model = OnnxModel(version / "model.onnx")
    x = np.random.default_rng(5).random((6, 3, 32, 32), dtype=np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        want = module(torch.from_numpy((x - mean) / std)).numpy()
    np.testing.assert_allclose(model.run(x).logits, want, atol=1e-4, rtol=1e-4)
    meta = json.loads(model.metadata[META_IMPORT])
    assert meta["pytorch"]["from"] == "torchvision" and meta["pytorch"]["architecture"] == "resnet18"
    np.savez(tmp_path / "x.npz", x=x)
    summary = run_predict(version, tmp_path / "d.parquet", data=tmp_path / "x.npz")
    assert summary.inputs == 6 and summary.errors == 0


@pytest.mark.parametrize("which", ["lr", "resnet"])
def test_imported_models_serve(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A real ``bentoml serve`` on the imported entry answers as ``decide`` does offline."""
    version = request.getfixturevalue("lr_entry") if which == "lr" else request.getfixturevalue("resnet")[1]
    model = OnnxModel(version / "model.onnx")
    if which == "lr":
        x = load_digits("test").x[:8]
    else:
        x = np.random.default_rng(9).random((8, 3, 32, 32), dtype=np.float32)
    out = model.run(x)
    expected = decide(
        out.logits,
        out.selection,
        load_calibration(version / "calibration.json").operating_point(None),
        model.class_names,
    )
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            bentoml_command(port),
            env=service_env(model_dir=version, workers=1, ort_threads=1),
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", process, log)
        import httpx

        reply = httpx.post(f"{url}/predict", json={"pixels": x.tolist()}, timeout=60)
        assert reply.status_code == 200, reply.text
        got = reply.json()["predictions"]
        assert [p["decision"] for p in got] == [e["decision"] for e in expected]
        for p, e in zip(got, expected, strict=True):
            assert p["confidence"] == pytest.approx(e["confidence"], abs=1e-6)
    finally:
        stop(process)


def test_cli_import_and_its_errors(sklearn_lr, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from abstain.cli import app

    _, graph, labels = sklearn_lr
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "import",
            str(graph),
            "--name",
            "lr",
            "--labels",
            str(labels),
            "--input-spec",
            "1,8,8",
            "--logits",
            "probabilities",
            "--probabilities",
            "--repository",
            str(tmp_path / "models"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert (
        "parity vs the original" in ok.output and (tmp_path / "models" / "lr" / "1" / "model.onnx").is_file()
    )
    # no --input-spec for a flat [N, 64] input: says what to give; nothing written
    bad = runner.invoke(
        app,
        [
            "import",
            str(graph),
            "--name",
            "lr2",
            "--labels",
            str(labels),
            "--logits",
            "probabilities",
            "--repository",
            str(tmp_path / "models"),
        ],
    )
    assert bad.exit_code != 0 and "--input-spec C,H,W" in str(bad.exception)  # main() prints it
    assert not (tmp_path / "models" / "lr2").exists()
    wrong = tmp_path / "three.txt"
    wrong.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="10 classes but the labels file names 3"):
        import_onnx(
            graph,
            "lr3",
            wrong,
            tmp_path / "models",
            input_spec=(1, 8, 8),
            logits_output="probabilities",
            probabilities=True,
        )
    with pytest.raises(ValueError, match="--input-spec 1,4,4 gives 16"):
        import_onnx(
            graph,
            "lr3",
            labels,
            tmp_path / "models",
            input_spec=(1, 4, 4),
            logits_output="probabilities",
            probabilities=True,
        )
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["lr"]


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_torchscript_and_torch_export_files(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = TinyNet().eval()
    example = torch.rand(2, 1, 12, 12)
    if kind == "torchscript":
        path = tmp_path / "net.ts"
        torch.jit.save(torch.jit.script(net), path)
    else:
        path = tmp_path / "net.pt2"
        batch = torch.export.Dim("batch", min=1)
        torch.export.save(torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}}), path)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    result = import_torch(
        path,
        "tiny",
        tmp_path / "labels.txt",
        tmp_path / "models",
        input_spec=(1, 12, 12),
        mean=(0.5,),
        std=(0.25,),
    )
    model = OnnxModel(result.model_path)
    x = np.random.default_rng(2).random((5, 1, 12, 12), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy((x - 0.5) / 0.25)).numpy()
    np.testing.assert_allclose(model.run(x).logits, want, atol=1e-5, rtol=1e-4)
    assert json.loads(model.metadata[META_IMPORT])["pytorch"]["from"] == kind
