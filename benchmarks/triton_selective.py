"""Benchmark: Triton serving the selective graph vs Triton serving the base graph vs ``abstain serve``.

Run: ``nice -n 10 python benchmarks/triton_selective.py [--seconds 10] [--clients 8]``. Starts,
in one run on 127.0.0.1, the ``nvidia-pytriton`` wheel's ``tritonserver`` with
``models/digits`` and ``models/digits-selective`` (through the Python-backend stand-in for
``onnxruntime_onnx`` that the tests use: the wheel lacks the ONNX Runtime backend) and
``abstain serve`` (embedded ONNX Runtime, 1 worker), then drives each in turn with ``--clients``
threads sending single-image requests back to back for ``--seconds`` (HTTP; each thread its
own client), and reports requests/s and latency percentiles. What a client gets: Triton base →
logits + selection (the decision still to be made); Triton selective → ``accept`` for every
operating point; ``abstain serve`` → the JSON decision. Writes ``## Triton selective serving``
of ``docs/benchmarks.md``. The load generator shares the machine's cores with the servers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from report import cpu_count, cpu_model, replace_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from abstain.contract import ACCEPT_NAME, INPUT_NAME, LOGITS_NAME, SELECTION_NAME  # noqa: E402
from tests.digits import load_digits  # noqa: E402
from tests.serving.servers import (  # noqa: E402
    bentoml_command,
    free_port,
    service_env,
    start_triton,
    stop,
    wait_ready,
)
from tests.serving.triton_repository import write_python_backend_repository  # noqa: E402

HEADING = "Triton selective serving"
BASE_DIR = ROOT / "models" / "digits" / "1"
SELECTIVE_DIR = ROOT / "models" / "digits-selective" / "1"


def drive(
    make_call: Callable[[], Callable[[np.ndarray], object]], x: np.ndarray, clients: int, seconds: float
) -> tuple[float, list[float]]:
    """``clients`` threads calling back to back for ``seconds``: (requests/s, latencies in s)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    start = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        call = make_call()
        call(x[i : i + 1])  # connect outside the timed window
        start.wait()
        j = i
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            call(x[j % len(x) : j % len(x) + 1])
            latencies[i].append(time.perf_counter() - t0)
            j += clients

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [v for per in latencies for v in per]
    return len(flat) / elapsed, flat


def triton_call(
    port: int, model: str, outputs: tuple[str, ...]
) -> Callable[[], Callable[[np.ndarray], object]]:
    def make() -> Callable[[np.ndarray], object]:
        import tritonclient.http as client_lib

        client = client_lib.InferenceServerClient(f"127.0.0.1:{port}")
        requested = [client_lib.InferRequestedOutput(n) for n in outputs]

        def call(x: np.ndarray) -> object:
            inp = client_lib.InferInput(INPUT_NAME, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(model, [inp], outputs=requested).as_numpy(outputs[0])

        return call

    return make


def service_call(url: str) -> Callable[[], Callable[[np.ndarray], object]]:
    def make() -> Callable[[np.ndarray], object]:
        import httpx

        client = httpx.Client(base_url=url, timeout=30)

        def call(x: np.ndarray) -> object:
            reply = client.post("/predict", json={"pixels": x.tolist()})
            reply.raise_for_status()
            return reply

        return call

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    args = parser.parse_args()
    x = np.ascontiguousarray(load_digits("test").x, dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="abstain-bench-triton-"))
    repo = tmp / "repository"
    write_python_backend_repository(BASE_DIR, repo)
    write_python_backend_repository(SELECTIVE_DIR, repo)
    triton, http, _grpc, _ = start_triton(repo, tmp, ["digits", "digits-selective"])
    port = free_port()
    log = tmp / "bentoml.log"
    with open(log, "wb") as out:
        service = subprocess.Popen(
            bentoml_command(port),
            env=service_env(model_dir=BASE_DIR, workers=1),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    rows = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", service, log)
        runs = [
            (
                "Triton, base graph (logits + selection)",
                triton_call(http, "digits", (LOGITS_NAME, SELECTION_NAME)),
            ),
            (
                "Triton, selective graph (accept, scores)",
                triton_call(http, "digits-selective", (ACCEPT_NAME,)),
            ),
            (
                "abstain serve, embedded ONNX Runtime (JSON decision)",
                service_call(f"http://127.0.0.1:{port}"),
            ),
        ]
        for name, make in runs:
            rate, lat = drive(make, x, args.clients, args.seconds)
            q = statistics.quantiles(lat, n=100)
            rows.append((name, rate, q[49] * 1e3, q[98] * 1e3))
            print(f"{name}: {rate:.0f} req/s, p50 {q[49] * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms", flush=True)
    finally:
        stop(service)
        stop(triton)
    load = os.getloadavg()[0]  # other jobs on the machine: says how much the figures can be trusted
    machine = (
        f"nproc {cpu_count()}, {cpu_model()}, Python {platform.python_version()}, load average {load:.1f}"
    )
    lines = [
        f"## {HEADING}",
        "",
        "`nice -n 10 python benchmarks/triton_selective.py "
        f"--seconds {args.seconds:g} --clients {args.clients}`"
        f" — single-image HTTP requests, {args.clients} client threads, {args.seconds:g} s per server, "
        "all three in one run on 127.0.0.1.",
        f"Machine: {machine}. Shared with other jobs while measured; the load generator runs on the "
        "same cores.",
        "",
        "| server | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *[f"| {n} | {r:.0f} | {p50:.2f} | {p99:.2f} |" for n, r, p50, p99 in rows],
        "",
        "Triton here is the `nvidia-pytriton` wheel's server running each graph through the "
        "Python-backend stand-in (ONNX Runtime inside Triton's Python stub), not the native "
        "`onnxruntime_onnx` backend, which the wheel lacks: both Triton rows pay the same stub "
        "overhead, so their difference is the decision's cost, and a native backend would be faster "
        "for both.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        replace_section(HEADING, text)
        print(f"wrote the {HEADING!r} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
