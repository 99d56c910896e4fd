"""``abstain serve`` with a Triton that misbehaves: late, killed under load, back with another graph.

One service, one sequence against the real ``tritonserver`` (restarted on the same ports):

1. start-up with Triton not running yet: the service is up (``/livez`` 200) but not ready,
   and ``/predict`` answers 503 ``backend_unavailable`` from what the monitor found (Triton
   unreachable), without a call of its own: sooner than one Triton call could time out;
2. Triton starts with the calibrated graph: ready without a restart, answers 200;
3. Triton is killed (SIGKILL) under concurrent load: every answer is 200 or 503
   ``backend_unavailable`` (never a 504 of the service's own request timeout, never another
   5xx), each 503 counted as a backend failure, each answer within a few
   ``ABSTAIN_TRITON_TIMEOUT`` (the service gives up on a call after it plus half a second),
   far below ``ABSTAIN_TIMEOUT``; ``/readyz`` 503;
4. Triton comes back serving *another* graph as ``digits`` version 1: ``/readyz`` stays 503
   and requests get 503 ``graph_mismatch`` — never an answer from the wrong graph;
5. Triton comes back with the calibrated graph: ready again, 200.

Every answer's status is counted. The only time limits are multiples of the configured
timeouts, and the deadlines of "wait until" loops, which only a hang reaches.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.digits import load_digits
from tests.graph_factory import write_graph
from tests.serving.servers import MODEL_DIR, free_port, pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository

pytestmark = [pytest.mark.server, pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton")]

#: ABSTAIN_TRITON_TIMEOUT: one Triton call; ABSTAIN_TIMEOUT (whole seconds): one request (a 504)
TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = int(10 * TIMEOUT_S)
#: Longest wait for a state the service reaches by itself (a probe every 0.5 s while not ready)
WITHIN_S = 60.0
ONE = {"pixels": load_digits("test").x[:1].tolist()}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def status(url: str, path: str) -> int:
    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return -1


def test_triton_late_killed_swapped_and_back(start_server, tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_python_backend_repository(MODEL_DIR, good)
    # the impostor: another graph with the same contract, as "digits" version 1
    write_python_backend_repository(MODEL_DIR, bad, graph=write_graph(tmp_path / "other.onnx"))
    http, grpc = free_port(), free_port()

    # 1. Triton not there yet
    service = start_server(
        wait="/livez",
        model_dir=MODEL_DIR,
        backend="triton",
        triton_url=f"127.0.0.1:{http}",
        triton_timeout=TIMEOUT_S,
        triton_probe_interval=1.0,
        timeout=REQUEST_TIMEOUT_S,
        workers=1,
    )
    url = service.url
    assert status(url, "/livez") == 200 and status(url, "/readyz") == 503
    started = time.monotonic()
    reply = httpx.post(f"{url}/predict", json=ONE, timeout=30)
    took = time.monotonic() - started
    assert reply.status_code == 503 and reply.json()["reason"] == "backend_unavailable", reply.text
    # known down: the monitor's verdict (its probe could not reach Triton), answered at once
    assert "cannot reach Triton" in reply.json()["error"], reply.text
    assert took < TIMEOUT_S, f"known down, yet answered after {took:.2f} s"

    triton = None
    try:
        # 2. Triton arrives with the calibrated graph
        triton, *_ = start_triton(good, tmp_path, ["digits"], http=http, grpc=grpc)
        wait_for(lambda: status(url, "/readyz") == 200, WITHIN_S, "ready once Triton serves the graph")
        assert httpx.post(f"{url}/predict", json=ONE, timeout=30).status_code == 200

        # 3. killed under load
        counts: Counter[int] = Counter()
        reasons: Counter[str] = Counter()
        slowest = [0.0]
        lock = threading.Lock()
        stopping = threading.Event()
        failed_before = service.metric("abstain_backend_errors_total")

        def client() -> None:
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S * 3) as c:
                while not stopping.is_set():
                    t0 = time.monotonic()
                    reply = c.post("/predict", json=ONE)
                    took = time.monotonic() - t0
                    with lock:
                        slowest[0] = max(slowest[0], took)
                        counts[reply.status_code] += 1
                        if reply.status_code == 503:
                            reasons[reply.json().get("reason")] += 1

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: counts[200] >= 12, WITHIN_S, "answers under load before the kill")
        os.killpg(triton.pid, signal.SIGKILL)
        triton.wait(10)
        wait_for(lambda: counts[503] >= 12, WITHIN_S, "503 answers once Triton is gone")
        time.sleep(TIMEOUT_S + 1)  # calls hung at the kill have reached their timeout by now
        stopping.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S * 3)
        assert not any(t.is_alive() for t in threads), "a request never ended"
        assert set(counts) <= {200, 503}, counts  # no 504: every request ended before ABSTAIN_TIMEOUT
        assert set(reasons) == {"backend_unavailable"}, reasons
        # every 503 went through the backend-failure path (counted there), none elsewhere
        assert service.metric("abstain_backend_errors_total") - failed_before == counts[503], counts
        # a call to a dead Triton fails or times out after TIMEOUT_S, and the service stops waiting
        # at TIMEOUT_S + 0.5 s: three times TIMEOUT_S is slack, ABSTAIN_TIMEOUT (a 504) far above
        assert slowest[0] < 3 * TIMEOUT_S, f"a request took {slowest[0]:.2f} s"
        assert status(url, "/readyz") == 503 and status(url, "/livez") == 200

        # 4. back with another graph under the same name and version
        triton, *_ = start_triton(bad, tmp_path, ["digits"], http=http, grpc=grpc)

        def mismatch() -> bool:
            body = httpx.post(f"{url}/predict", json=ONE, timeout=30)
            assert body.status_code == 503, body.text  # never an answer from the wrong graph
            return body.json()["reason"] == "graph_mismatch"

        wait_for(mismatch, WITHIN_S, "503 graph_mismatch once the impostor answers the probe")
        assert status(url, "/readyz") == 503
        for _ in range(20):
            assert mismatch()
        stop(triton)

        # 5. the calibrated graph again
        triton, *_ = start_triton(good, tmp_path, ["digits"], http=http, grpc=grpc)
        wait_for(lambda: status(url, "/readyz") == 200, WITHIN_S, "ready again with the calibrated graph")
        assert httpx.post(f"{url}/predict", json=ONE, timeout=30).status_code == 200
    finally:
        if triton is not None:
            stop(triton)
