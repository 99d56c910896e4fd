"""``abstain import``: classifiers made elsewhere become contract entries that calibrate and serve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from abstain.calibration.calibrate import run_calibration
from abstain.calibration.evaluate import run_evaluation
from abstain.contract import META_IMPORTED
from abstain.datasets import load_digits
from abstain.export.importer import import_onnx
from abstain.runtime import OnnxModel
from tests.serving.servers import bentoml_command, free_port, service_env, stop, wait_ready

REPO = Path(__file__).resolve().parents[2]
DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def lr_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's logistic regression on the digits train split, converted by skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    train = load_digits("train")
    x = train.x.reshape(len(train.y), -1)
    lr = LogisticRegression(max_iter=2000).fit(x, train.y)
    path = tmp_path_factory.mktemp("lr") / "lr.onnx"
    path.write_bytes(to_onnx(lr, x[:1], options={"zipmap": False}, target_opset=17).SerializeToString())
    lr_probs = lr.predict_proba(load_digits("test").x.reshape(360, -1))
    np.save(path.with_suffix(".npy"), lr_probs)
    return path


def test_sklearn_classifier_imports_calibrates_evaluates_and_serves(lr_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(DIGITS) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "import",
            str(lr_onnx),
            "--name",
            "digits-lr",
            "--labels",
            str(labels),
            "--input-spec",
            "1,8,8",
            "--logits",
            "probabilities",
            "--probabilities",
            "--repository",
            str(repo),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote " in done.stdout and "max |Δ|" in done.stdout
    entry = repo / "digits-lr"
    assert sorted(p.name for p in entry.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    model = OnnxModel(entry / "1" / "model.onnx")
    imported = json.loads(model.metadata[META_IMPORTED])
    assert imported["logits_output"] == "probabilities" and imported["probabilities"] is True
    # pixels in [0, 1] in, scikit-learn's own probabilities out (softmax of our logits)
    test = load_digits("test")
    out = model.run(test.x)
    probs = np.exp(out.logits) / np.exp(out.logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, np.load(lr_onnx.with_suffix(".npy")), atol=1e-5)
    np.testing.assert_allclose(out.selection, probs.max(axis=1), atol=1e-6)  # the softmax response

    cal = run_calibration(entry, dataset="digits", split="val", coverages=[0.8, 0.9], risks=[])
    assert cal.calibration.names == ["coverage-0.8", "coverage-0.9"]
    report = run_evaluation(entry, tmp_path / "eval", dataset="digits", split="test").report
    assert {row["name"] for row in report["operating_points"]} == {"coverage-0.8", "coverage-0.9"}

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as sink:
        env = service_env(tmp_path / "bentoml", model_dir=entry, workers=1)
        process = subprocess.Popen(
            bentoml_command(port),
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", process, log)
        reply = httpx.post(
            f"{url}/predict",
            json={"pixels": test.x[:5].tolist(), "operating_point": "coverage-0.9"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        point = cal.calibration.operating_point("coverage-0.9")
        for answer, score in zip(reply.json()["predictions"], out.selection[:5], strict=True):
            assert answer["score"] == "softmax_response" or answer["score"] == point.score
            assert (answer["decision"] == "predict") == (answer["score_value"] >= point.threshold)
            assert answer["selection"] == pytest.approx(float(score), abs=1e-6)
    finally:
        stop(process)


def _parity(entry: Path, module: torch.nn.Module, mean: list[float], std: list[float]) -> None:
    """The imported graph on pixels in [0, 1] equals the module on normalised pixels."""
    model = OnnxModel(entry / "1" / "model.onnx")
    x = np.random.default_rng(1).random((3, *model.input_spec.shape), dtype=np.float32)
    with torch.no_grad():
        norm = (torch.from_numpy(x) - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(
            1, -1, 1, 1
        )
        expected = module(norm).numpy()
    np.testing.assert_allclose(model.run(x).logits, expected, atol=1e-4, rtol=1e-4)


def test_torchvision_classifier_with_local_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    weights = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "import",
            "--torchvision",
            "resnet18",
            "--weights",
            str(weights),
            "--name",
            "rn",
            "--labels",
            str(labels),
            "--input-spec",
            "3,32,32",
            "--mean",
            "0.485,0.456,0.406",
            "--std",
            "0.229,0.224,0.225",
            "--repository",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    _parity(tmp_path / "models" / "rn", net, mean, std)
    # it calibrates like any entry (random weights: the numbers mean nothing, the path works)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "held_out.npz", x=rng.random((60, 3, 32, 32), dtype=np.float32), y=rng.integers(0, 5, 60)
    )
    run_calibration(tmp_path / "models" / "rn", data=tmp_path / "held_out.npz", coverages=[0.9], risks=[])


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_torchscript_and_torch_export_files(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).eval()
    if kind == "torchscript":
        path = tmp_path / "net.pt"
        torch.jit.script(net).save(str(path))
    else:
        path = tmp_path / "net.pt2"
        batch = torch.export.Dim("batch", min=1)
        torch.export.save(
            torch.export.export(net, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), str(path)
        )
    labels = tmp_path / "labels.txt"
    labels.write_text("x\ny\nz\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "import",
            str(path),
            "--name",
            "net",
            "--labels",
            str(labels),
            "--input-spec",
            "1,8,8",
            "--mean",
            "0.5",
            "--std",
            "0.25",
            "--repository",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    _parity(tmp_path / "models" / "net", net, [0.5], [0.25])
    meta = json.loads(OnnxModel(tmp_path / "models" / "net" / "1" / "model.onnx").metadata[META_IMPORTED])
    assert meta["format"] == kind


def test_bad_imports_say_why_and_write_nothing(lr_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    with pytest.raises(ValueError, match="scores 10 classes but 3 labels"):
        import_onnx(
            lr_onnx,
            "x",
            ["a", "b", "c"],
            repo,
            input_spec="1,8,8",
            logits_output="probabilities",
            probabilities=True,
        )
    with pytest.raises(ValueError, match=r"not an output of the graph; its outputs are \['label', 'probabi"):
        import_onnx(lr_onnx, "x", DIGITS, repo, input_spec="1,8,8", logits_output="scores")
    with pytest.raises(ValueError, match="give --input-spec"):
        import_onnx(lr_onnx, "x", DIGITS, repo, logits_output="probabilities")
    with pytest.raises(ValueError, match="flattens to 192"):
        import_onnx(lr_onnx, "x", DIGITS, repo, input_spec="3,8,8", logits_output="probabilities")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="not a valid ONNX graph"):
        import_onnx(tmp_path / "junk.onnx", "x", DIGITS, repo)
    assert not repo.exists()


def test_imported_graph_passes_the_checker_and_keeps_the_original_ops(lr_onnx: Path, tmp_path: Path) -> None:
    result = import_onnx(
        lr_onnx, "lr", DIGITS, tmp_path, input_spec="1,8,8", logits_output="probabilities", probabilities=True
    )
    proto = onnx.load(result.model_path)
    onnx.checker.check_model(proto, full_check=True)
    assert "LinearClassifier" in {n.op_type for n in proto.graph.node}  # scikit-learn's own op, kept
    assert [o.name for o in proto.graph.output] == ["logits", "selection"]
    session = ort.InferenceSession(result.model_path.read_bytes(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
