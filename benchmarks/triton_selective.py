"""Serving benchmark: Triton serving the selective graph vs the base graph vs ``abstain serve``.

Same run, same machine: one ``tritonserver`` (the nvidia-pytriton wheel, Python-backend ONNX
Runtime stand-in, see ``serving/triton_python_model``) serves both ``digits`` and
``digits-selective``; ``bentoml serve`` runs the embedded service (ONNX Runtime, batch ≤ 64,
wait 0 ms). Each target gets single-image requests from ``--concurrency`` async clients on
127.0.0.1 for ``--seconds`` (Triton: ``tritonclient.grpc.aio``; the service: ``httpx`` JSON
``POST /predict``), rounds alternating the targets. Prints req/s and latency percentiles and
writes ``## Triton selective serving`` in ``docs/benchmarks.md``.

    nice -n 10 python benchmarks/triton_selective.py        # ≈ 1 min

The load generator shares the cores with the servers: the figures compare the three paths
with each other on this machine, they are not a capacity figure for a dedicated host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import cpu_count, cpu_model, replace_section
from serve_batching import load as load_service
from serve_batching import start as start_service
from serve_batching import stop as stop_service

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' Triton launcher (pytriton wheel layout) is reused as is
from abstain.contract import ACCEPT_NAME, INPUT_NAME, LOGITS_NAME, SELECTION_NAME  # noqa: E402
from abstain.serving.triton_repository import write_python_backend_repository  # noqa: E402
from tests.serving.servers import start_triton, stop  # noqa: E402

HEADING = "Triton selective serving"


async def load_triton(
    port: int, model: str, outputs: list[str], x: np.ndarray, seconds: float, concurrency: int
) -> tuple[int, list[float], int]:
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(f"127.0.0.1:{port}")
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def one() -> None:
        inp = grpc.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        await client.infer(model, [inp], outputs=[grpc.InferRequestedOutput(n) for n in outputs])

    async def loop() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await one()
                latencies.append(time.perf_counter() - t0)
            except Exception:  # counted, not hidden
                errors += 1

    await one()  # warm-up
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    await client.close()
    return len(latencies), latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from abstain.datasets import load_digits

    x = np.ascontiguousarray(load_digits("test").x[:1])
    # other jobs on a shared machine skew every figure: record how busy it was
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="abstain-bench-triton-"))
    repo = tmp / "repository"
    write_python_backend_repository(REPO / "models" / "digits" / "1", repo)
    write_python_backend_repository(REPO / "models" / "digits-selective" / "1", repo)
    triton, _http, grpc_port, _log = start_triton(repo, tmp, ["digits", "digits-selective"])
    service, url = start_service(64, 0.0, 1)
    targets = {
        "Triton, base graph (logits, selection)": lambda: load_triton(
            grpc_port, "digits", [LOGITS_NAME, SELECTION_NAME], x, args.seconds, args.concurrency
        ),
        "Triton, selective graph (accept + logits, selection)": lambda: load_triton(
            grpc_port,
            "digits-selective",
            [ACCEPT_NAME, LOGITS_NAME, SELECTION_NAME],
            x,
            args.seconds,
            args.concurrency,
        ),
        "abstain serve (embedded ONNX Runtime, JSON)": lambda: load_service(
            url, args.seconds, args.concurrency, {"pixels": x.tolist()}
        ),
    }
    results: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in targets}
    try:
        for _ in range(args.repeats):
            for label, run in targets.items():
                n, lat, errors = asyncio.run(run())
                ms = np.array(lat) * 1000
                results[label].append(
                    (n / args.seconds, np.percentile(ms, 50), np.percentile(ms, 99), errors)
                )
    finally:
        stop(triton)
        stop_service(service)
    rows = []
    for label, runs in results.items():
        rps, p50, p99 = (float(np.median([r[i] for r in runs])) for i in range(3))
        errors = sum(r[3] for r in runs)
        print(f"{label:55s} {rps:8.1f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  errors {errors}")
        rows.append(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {errors} |")
    section = (
        f"## {HEADING}\n\n"
        f"`nice -n 10 python benchmarks/triton_selective.py --seconds {args.seconds:g} --concurrency "
        f"{args.concurrency} --repeats {args.repeats}` on {cpu_count()} CPU cores ({cpu_model()}), no GPU, "
        f"load generator on the same cores; load average before the run {load_before}. "
        "Single-image requests from "
        f"{args.concurrency} async clients; medians over {args.repeats} alternating rounds. Triton is the "
        "nvidia-pytriton wheel's tritonserver running the graphs through the Python-backend ONNX Runtime "
        "stand-in (the wheel has no `onnxruntime_onnx` backend), over gRPC; `abstain serve` is one "
        "worker, batch ≤ 64, wait 0 ms, over HTTP/JSON.\n\n"
        "| target | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    replace_section(HEADING, section)


if __name__ == "__main__":
    main()
