"""The remote backend against a real ``tritonserver`` (the nvidia-pytriton wheel's binary).

Triton serves the same ``model.onnx`` through a Python-backend model running ONNX Runtime
(``tests/serving/triton_python_model``), because the wheel lacks the ``onnxruntime_onnx`` backend.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from abstain.contract import MODEL_FILENAME
from abstain.runtime import OnnxModel
from abstain.serving.triton.backend import TritonBackend, verify_triton_serves
from tests.digits import load_digits
from tests.graph_factory import write_graph
from tests.serving.servers import MODEL_DIR, Server, pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository

pytestmark = [pytest.mark.server, pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton")]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """Triton with ``digits`` (the served graph) and ``impostor`` (another graph, same contract)."""
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repository"
    write_python_backend_repository(MODEL_DIR, repo)
    impostor = tmp / "impostor" / MODEL_DIR.name
    (impostor.parent / "config.pbtxt").parent.mkdir(parents=True)
    (impostor.parent / "config.pbtxt").write_text(
        (MODEL_DIR.parent / "config.pbtxt").read_text().replace('name: "digits"', 'name: "impostor"')
    )
    shutil.copyfile(MODEL_DIR.parent / "labels.txt", impostor.parent / "labels.txt")
    write_python_backend_repository(impostor, repo, graph=write_graph(tmp / "other.onnx"))
    process, http, grpc, _log = start_triton(repo, tmp, ["digits", "impostor"])
    yield http, grpc
    stop(process)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_outputs_equal_local_onnxruntime(triton: tuple[int, int], protocol: str) -> None:
    http, grpc = triton
    url = f"127.0.0.1:{http}" if protocol == "http" else f"grpc://127.0.0.1:{grpc}"
    backend = TritonBackend(url, "digits", MODEL_DIR.name)
    x = load_digits("test").x[:64]
    remote, local = backend.infer(x), OnnxModel(MODEL_DIR / MODEL_FILENAME).run(x)
    np.testing.assert_allclose(remote.logits, local.logits, atol=1e-5)
    np.testing.assert_allclose(remote.selection, local.selection, atol=1e-6)
    assert remote.selection.shape == (64,)


def test_verify_refuses_another_graph_or_version(triton: tuple[int, int]) -> None:
    url = f"127.0.0.1:{triton[0]}"
    graph = MODEL_DIR / MODEL_FILENAME
    verify_triton_serves(url, graph, "digits", MODEL_DIR.name)  # the calibrated graph: accepted
    with pytest.raises(ValueError, match="does not serve the calibrated graph"):
        verify_triton_serves(url, graph, "impostor", MODEL_DIR.name)
    with pytest.raises(ValueError, match="is not ready"):
        verify_triton_serves(url, graph, "digits", "99")
    with pytest.raises(ValueError, match="cannot reach"):
        verify_triton_serves("127.0.0.1:1", graph, "digits", MODEL_DIR.name)


def test_abstain_serve_refuses_a_triton_serving_another_graph(
    triton: tuple[int, int], tmp_path: Path
) -> None:
    # serve a model entry named "impostor" whose calibrated graph is the digits graph:
    # Triton's "impostor" is a different graph, so the start-up probe must refuse
    entry = tmp_path / "impostor"
    (entry / MODEL_DIR.name).mkdir(parents=True)
    for name in ("model.onnx", "calibration.json"):
        (entry / MODEL_DIR.name / name).write_bytes((MODEL_DIR / name).read_bytes())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "serve",
            str(entry),
            "--backend",
            "triton",
            "--triton-url",
            f"127.0.0.1:{triton[0]}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not serve the calibrated graph" in result.stderr


def test_triton_backend_decisions_equal_embedded_on_digits_test(
    triton: tuple[int, int], server: Server, start_server
) -> None:
    remote = start_server(
        model_dir=MODEL_DIR, backend="triton", triton_url=f"grpc://127.0.0.1:{triton[1]}", workers=1
    )
    x = load_digits("test").x
    chunks = np.array_split(np.arange(len(x)), 6)
    with server.client() as embedded_client, remote.client() as remote_client:
        embedded = [
            p
            for i in chunks
            for p in embedded_client.post("/predict", json={"pixels": x[i].tolist()}).json()["predictions"]
        ]
        replies = [remote_client.post("/predict", json={"pixels": x[i].tolist()}) for i in chunks]
    assert all(r.status_code == 200 for r in replies), replies[0].text
    triton_answers = [p for r in replies for p in r.json()["predictions"]]
    assert len(triton_answers) == len(x) == len(embedded)
    for a, b in zip(embedded, triton_answers, strict=True):
        assert a["decision"] == b["decision"]
        assert a.get("class_index") == b.get("class_index") and a.get("candidate") == b.get("candidate")
        assert a["score_value"] == pytest.approx(b["score_value"], abs=1e-6)
    assert remote.metric("abstain_inference_seconds_count", backend="triton") > 0


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A 127.0.0.1 port that accepts connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stopping.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stopping.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    sock.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_calls_time_out_instead_of_hanging(black_hole: int, protocol: str) -> None:
    url = f"127.0.0.1:{black_hole}" if protocol == "http" else f"grpc://127.0.0.1:{black_hole}"
    backend = TritonBackend(url, "digits", MODEL_DIR.name, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - the client's own timeout error type
        backend.infer(load_digits("test").x[:2])
    assert time.monotonic() - start < 10  # the clients' defaults would wait 60 s or forever


def test_triton_going_down_answers_503_and_the_service_lives_on(
    start_server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # a Triton of this test's own, so that stopping it leaves the module's fixture alone
    tmp = tmp_path_factory.mktemp("triton-down")
    write_python_backend_repository(MODEL_DIR, tmp / "repository")
    process, http, _grpc, _log = start_triton(tmp / "repository", tmp, ["digits"])
    try:
        remote = start_server(
            model_dir=MODEL_DIR, backend="triton", triton_url=f"127.0.0.1:{http}", workers=1, triton_timeout=2
        )
        one = {"pixels": load_digits("test").x[:1].tolist()}
        with remote.client() as client:
            assert client.post("/predict", json=one).status_code == 200
            labels = dict(model="digits", version=MODEL_DIR.name, backend="triton")
            before = remote.metric("abstain_backend_errors_total", **labels)
            rejected = remote.metric("abstain_rejected_inputs_total")
            stop(process)
            for _ in range(2):
                reply = client.post("/predict", json=one)
                assert reply.status_code == 503, reply.text
                body = reply.json()
                assert body["reason"] == "backend_unavailable" and "triton" in body["error"]
            assert remote.metric("abstain_backend_errors_total", **labels) - before == 2
            # not the client's fault: not a rejected input
            assert remote.metric("abstain_rejected_inputs_total") == rejected
            assert client.get("/livez").status_code == 200
            assert httpx.get(f"{remote.url}/metadata", timeout=10).status_code == 200
    finally:
        stop(process)
