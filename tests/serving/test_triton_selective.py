"""The selective entry (``models/digits-selective``) served by a real ``tritonserver``.

Triton runs the selective graph through the Python-backend stand-in for ``onnxruntime_onnx``
(``serving/triton_python_model``), and a plain ``tritonclient`` — no abstain code on the
client side — reads ``accept`` for every operating point. It must equal the embedded service's
decision (``serving/decisions.py`` on the base graph's outputs) on the whole digits test split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from abstain.contract import (
    ACCEPT_NAME,
    CLASS_INDEX_NAME,
    CONFIDENCE_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    META_SELECTIVE,
    MODEL_FILENAME,
    SCORES_NAME,
    SELECTION_NAME,
)
from abstain.operating_points import OperatingPoint, load_calibration
from abstain.runtime import OnnxModel
from abstain.serving.decisions import PREDICT, decide
from abstain.serving.triton_repository import write_python_backend_repository
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, REPO, pytriton_dir, start_triton, stop

pytestmark = [pytest.mark.server, pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton")]

SELECTIVE_DIR = REPO / "models" / "digits-selective" / "1"
NAME = SELECTIVE_DIR.parent.name


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    tmp = tmp_path_factory.mktemp("triton-selective")
    repo = tmp / "repository"
    write_python_backend_repository(SELECTIVE_DIR, repo)
    process, http, grpc, _log = start_triton(repo, tmp, [NAME])
    yield http, grpc
    stop(process)


def infer(protocol: str, port: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """One ``tritonclient`` request per 128 images; every output of the selective entry."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module  # type: ignore[no-redef]
    client = client_module.InferenceServerClient(f"127.0.0.1:{port}")
    names = [LOGITS_NAME, SELECTION_NAME, CLASS_INDEX_NAME, CONFIDENCE_NAME, SCORES_NAME, ACCEPT_NAME]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(x), 128):
        chunk = np.ascontiguousarray(x[start : start + 128])
        inp = client_module.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        result = client.infer(
            NAME, [inp], model_version="1", outputs=[client_module.InferRequestedOutput(n) for n in names]
        )
        for n in names:
            parts[n].append(result.as_numpy(n))
    return {n: np.concatenate(v) for n, v in parts.items()}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_decisions_equal_the_embedded_service_for_every_operating_point(
    triton: tuple[int, int], protocol: str
) -> None:
    http, grpc = triton
    x = load_digits("test").x  # 360 images
    remote = infer(protocol, http if protocol == "http" else grpc, x)
    calibration = load_calibration(MODEL_DIR / "calibration.json")
    local = OnnxModel(MODEL_DIR / MODEL_FILENAME, intra_op_threads=1, prefer_cuda=False).run(x)
    names = [str(k) for k in range(local.logits.shape[1])]
    assert remote[ACCEPT_NAME].shape == (360, len(calibration.operating_points))
    assert remote[ACCEPT_NAME].dtype == np.bool_ and remote[CLASS_INDEX_NAME].dtype == np.int64
    for j, point in enumerate(calibration.operating_points):
        decisions = decide(local.logits, local.selection, point, names)
        want = np.array([d["decision"] == PREDICT for d in decisions])
        np.testing.assert_array_equal(remote[ACCEPT_NAME][:, j], want, err_msg=point.name)
        np.testing.assert_array_equal(remote[SCORES_NAME][:, j], [d["score_value"] for d in decisions])
        classes = [
            d["class_index"] if d["decision"] == PREDICT else d["candidate"]["class_index"] for d in decisions
        ]
        np.testing.assert_array_equal(remote[CLASS_INDEX_NAME].reshape(-1), classes)
    # the decision is not trivial on this split: some answered, some abstained
    assert 0 < remote[ACCEPT_NAME].sum() < remote[ACCEPT_NAME].size


def test_triton_reports_the_operating_points_it_was_built_with(triton: tuple[int, int]) -> None:
    """A Triton client can learn which column is which from the graph itself (its metadata)."""
    model = OnnxModel(SELECTIVE_DIR / MODEL_FILENAME, intra_op_threads=1, prefer_cuda=False)
    meta = json.loads(model.metadata[META_SELECTIVE])
    calibration = load_calibration(MODEL_DIR / "calibration.json")
    points = [
        OperatingPoint.from_dict({k: v for k, v in p.items() if k != "exact"})
        for p in meta["operating_points"]
    ]
    assert [(p.name, p.threshold) for p in points] == [
        (p.name, p.threshold) for p in calibration.operating_points
    ]


def test_backend_reads_triton_s_accept_for_a_selective_entry(triton: tuple[int, int]) -> None:
    from abstain.serving.backends import TritonBackend

    x = load_digits("test").x[:64]
    out = TritonBackend(f"127.0.0.1:{triton[0]}", NAME, "1", selective=True).infer(x)
    assert out.accept is not None and out.accept.shape == (64, 4) and out.accept.dtype == np.bool_
    plain = TritonBackend(f"127.0.0.1:{triton[0]}", NAME, "1").infer(x)
    assert plain.accept is None
    np.testing.assert_array_equal(out.logits, plain.logits)


def test_abstain_serve_fronting_the_selective_entry_answers_like_the_embedded_service(
    triton: tuple[int, int], server, start_server
) -> None:
    remote = start_server(
        model_dir=MODEL_DIR,
        backend="triton",
        triton_url=f"grpc://127.0.0.1:{triton[1]}",
        triton_model=NAME,
        workers=1,
    )
    x = load_digits("test").x
    chunks = np.array_split(np.arange(len(x)), 4)
    calibration = load_calibration(MODEL_DIR / "calibration.json")
    with server.client() as embedded_client, remote.client() as remote_client:
        for point in calibration.names:
            embedded, fronted = (
                [
                    p
                    for i in chunks
                    for p in c.post(
                        "/predict", json={"pixels": x[i].tolist(), "operating_point": point}
                    ).json()["predictions"]
                ]
                for c in (embedded_client, remote_client)
            )
            assert [p["decision"] for p in fronted] == [p["decision"] for p in embedded], point
            assert [p.get("class_index") for p in fronted] == [p.get("class_index") for p in embedded]


def test_abstain_serve_refuses_a_selective_entry_built_from_another_calibration(
    triton: tuple[int, int], tmp_path
) -> None:
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "models"
    shutil.copytree(MODEL_DIR.parent, repo / "digits")
    shutil.copytree(SELECTIVE_DIR.parent, repo / NAME)
    cal = repo / "digits" / "1" / "calibration.json"
    raw = json.loads(cal.read_text())
    raw["created_at"] = "2000-01-01T00:00:00+00:00"  # same thresholds, other file: other sha256
    cal.write_text(json.dumps(raw))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "serve",
            str(repo / "digits"),
            "--backend",
            "triton",
            "--triton-url",
            f"127.0.0.1:{triton[0]}",
            "--triton-model",
            NAME,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "another calibration" in result.stderr and "abstain export-selective" in result.stderr
