"""Serving benchmark: a bounded loopback load test of ``bentoml serve`` for a few batching settings.

For each setting it starts the real service (embedded digits model, ONNX Runtime) on a free
127.0.0.1 port, sends single-image ``POST /predict`` requests from each number of async
clients in ``--concurrency`` for ``--seconds``, prints throughput and latency percentiles, stops
the server, and
finally writes the ``## Serving`` section of ``docs/benchmarks.md`` (other sections are kept).

    nice -n 10 python benchmarks/serve_batching.py            # 4 and 16 clients, 2 servers each: ≈ 3 min

The load generator runs on the same machine and shares its cores with the server: the numbers
compare settings with each other, they are not a capacity figure for a dedicated host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from report import cpu_count, cpu_model, replace_section

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
#: (label, ABSTAIN_BATCH_MAX_SIZE, ABSTAIN_BATCH_MAX_LATENCY_MS)
SETTINGS = [
    ("no batching", 1, 0.0),
    ("batch ≤ 64, wait 0 ms", 64, 0.0),
    ("batch ≤ 64, wait 2 ms", 64, 2.0),
    ("batch ≤ 64, wait 10 ms", 64, 10.0),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(batch_size: int, latency_ms: float, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTAIN_")}
    env.update(
        BENTOML_DO_NOT_TRACK="true",
        ABSTAIN_BATCH_MAX_SIZE=str(batch_size),
        ABSTAIN_BATCH_MAX_LATENCY_MS=str(latency_ms),
        ABSTAIN_WORKERS=str(workers),
        ABSTAIN_MAX_CONCURRENCY="1000",
        ABSTAIN_MODEL_DIR=str(REPO / "models" / "digits"),
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "abstain.serving.service:Abstain",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(process)
    raise RuntimeError("server did not become ready in 90 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)


async def load(url: str, seconds: float, concurrency: int, body: dict) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            reply = await client.post("/predict", json=body)
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await client.post("/predict", json=body)  # warm-up
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return len(latencies), latencies, errors


def measure(
    setting: tuple[str, int, float], seconds: float, concurrency: int, repeats: int, workers: int, body: dict
) -> tuple[float, float, float, int]:
    """Median over ``repeats`` fresh servers: (req/s, p50 ms, p99 ms, errors summed)."""
    label, size, latency = setting
    runs = []
    for _ in range(repeats):
        process, url = start(size, latency, workers)
        try:
            n, lat, errors = asyncio.run(load(url, seconds, concurrency, body))
        finally:
            stop(process)
        ms = np.array(lat) * 1000
        runs.append((n / seconds, np.percentile(ms, 50), np.percentile(ms, 99), errors))
    rps, p50, p99 = (float(np.median([r[i] for r in runs])) for i in range(3))
    errors = sum(r[3] for r in runs)
    print(
        f"{concurrency:3d} clients  {label:24s} {rps:8.1f} req/s  p50 {p50:6.1f} ms  "
        f"p99 {p99:6.1f} ms  errors {errors}",
        flush=True,
    )
    return rps, p50, p99, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="load duration per setting")
    parser.add_argument("--concurrency", default="4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--repeats", type=int, default=2, help="fresh servers per setting (median reported)")
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args()
    from abstain.datasets import load_digits
    from abstain.serving.config.settings import ServeSettings

    defaults = ServeSettings(model_dir=REPO / "models" / "digits")  # only its batching defaults are read
    default_label = f"batch ≤ {defaults.batch_max_size}, wait {defaults.batch_max_latency_ms:g} ms"
    body = {"pixels": load_digits("test").x[0].tolist()}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    tables, verdicts = [], []
    for concurrency in concurrencies:
        rows = [
            (s[0], *measure(s, args.seconds, concurrency, args.repeats, args.workers, body)) for s in SETTINGS
        ]
        best = max(rows, key=lambda r: r[1])
        chosen = next((r for r in rows if r[0] == default_label), None)
        header = "| setting | throughput (req/s) | p50 (ms) | p99 (ms) | errors |\n|---|---|---|---|---|\n"
        lines = "\n".join(f"| {r[0]} | {r[1]:.0f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]} |" for r in rows)
        tables.append(f"{concurrency} concurrent clients:\n\n{header}{lines}")
        verdict = f"{concurrency} clients: best **{best[0]}** ({best[1]:.0f} req/s)"
        if chosen is not None:
            verdict += f", the default {chosen[1] / best[1]:.0%} of it"
        verdicts.append(verdict)
    text = f"""## Serving

`nice -n 10 python benchmarks/serve_batching.py --seconds {args.seconds:g} --concurrency {args.concurrency} \
--repeats {args.repeats} --workers {args.workers}` — single-image `POST /predict` requests from concurrent
loopback clients for {args.seconds:g} s per setting, the median of {args.repeats} fresh servers, embedded
digits model (ONNX Runtime, CPU), {args.workers} worker(s).

Machine: {platform.machine()}, {cpu_count()} CPU cores ({cpu_model()}),
Python {platform.python_version()}; the load generator shares these cores with the server, so compare
rows with each other rather than reading them as capacity. Single runs of one setting varied by up
to ±20 % here; hence the medians.

{chr(10).join(t + chr(10) for t in tables)}
Settings are `ABSTAIN_BATCH_MAX_SIZE` / `ABSTAIN_BATCH_MAX_LATENCY_MS`; the default is
**{default_label}**: batching what queued up during the previous pass. {"; ".join(verdicts)}.
A fixed wait only pays when requests arrive in bursts that a pass would split; at low load it adds
its full length to every request's latency (see `serving/inference/batcher.py`).
"""
    print(text)
    if not args.no_write:
        replace_section("Serving", text)


if __name__ == "__main__":
    main()
