"""Serving with the decision store on vs off: does recording every decision slow answers down?

Paired and repeated: ``--pairs`` times, a fresh server with ``ABSTAIN_STORE=off`` and a fresh
one with the default SQLite store (in a new temporary directory) are load-tested side by side,
at the same time, each by ``--concurrency`` async loopback clients sending single-image
``POST /predict`` requests for ``--seconds``: on a shared machine whose load swings by ±25 %
between runs a minute apart (measured: back-to-back runs were useless for a 5 % question),
only simultaneous runs see the same conditions. The start order alternates. Reported: each
pair's throughput ratio on/off, and the mean ± std of the ratios and of p50 / p99 latency
over pairs (target: on slower by at most 5 %).

Then, in-process, where the time of the store goes: what ``record`` costs on the event loop
per answer (it only queues), and how many decisions per second the recorder thread writes
to SQLite (which runs beside the event loop, off the answer's path).

    nice -n 10 python benchmarks/serve_store.py     # 8 side-by-side pairs, 6 s, 8 clients each: ≈ 3 min

Writes the ``## Decision store`` section of docs/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from report import cpu_count, cpu_model, replace_section
from serve_batching import free_port, load, stop

REPO = Path(__file__).resolve().parents[1]


def start(store: str, workers: int) -> tuple[subprocess.Popen, str, str]:
    """A fresh server with ``ABSTAIN_STORE=store`` (its own BENTOML_HOME); (process, url, home)."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="abstain-bench-store-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTAIN_")}
    env.update(
        BENTOML_DO_NOT_TRACK="true",
        BENTOML_HOME=home,
        ABSTAIN_STORE=store,
        ABSTAIN_WORKERS=str(workers),
        ABSTAIN_MAX_CONCURRENCY="1000",
        ABSTAIN_MODEL_DIR=str(REPO / "models" / "digits"),
    )
    argv = [sys.executable, "-m", "bentoml", "serve", "abstain.serving.service:Abstain",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url, home
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(process)
    raise RuntimeError("server did not become ready in 90 s")


def run_pair(
    workers: int, seconds: float, concurrency: int, body: dict, first: str
) -> dict[str, dict[str, float]]:
    """Fresh "off" and "on" servers, started in the order ``first`` names, load-tested at the same
    time (``concurrency`` clients each): whatever else the machine does hits both alike."""
    order = ("off", "sqlite") if first == "off" else ("sqlite", "off")
    servers = {}
    try:
        for store in order:
            servers[store] = start(store, workers)

        async def both() -> list:
            return await asyncio.gather(*(load(servers[s][1], seconds, concurrency, body) for s in order))

        results = dict(zip(order, asyncio.run(both()), strict=True))
        recorded = _recorded(servers["sqlite"][2])
    finally:
        for process, _, _ in servers.values():
            stop(process)
    out = {}
    for store, (n, latencies, errors) in results.items():
        ms = np.array(latencies) * 1000
        p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99))
        out[store] = {"rps": n / seconds, "p50": p50, "p99": p99, "errors": errors, "answers": n,
                      "recorded": recorded if store == "sqlite" else 0}  # fmt: skip
    return out


def _recorded(home: str) -> int:
    """Decisions in the server's SQLite store (proves the "on" runs did record)."""
    import sqlite3

    time.sleep(0.5)  # the recorder's last burst
    with sqlite3.connect(Path(home) / "abstain-store" / "decisions.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])


def where_the_time_goes(n: int = 20_000, burst: int = 25) -> tuple[float, float]:
    """(µs per answer recording adds on the event loop, decisions/s SQLite takes in bursts of ``burst``)."""
    import numpy as np

    from abstain.decisions import Decisions
    from abstain.operating_points import load_calibration
    from abstain.serving.http.request_ids import new_request_ids
    from abstain.serving.store.decision_store import Decision, Retention, SqliteStore
    from abstain.serving.store.live import DecisionLog

    calibration = load_calibration(REPO / "models" / "digits" / "1" / "calibration.json")
    # one answered image, as the service records it after each answer
    decisions = Decisions(
        answered=np.array([True]), class_index=np.array([7]), confidence=np.array([0.99]),
        selection=np.array([0.999]), score_value=np.array([0.999]),
        point=calibration.operating_point("coverage-0.9"),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        log = DecisionLog(
            lambda: SqliteStore(Path(tmp), Retention(10**6, 1e9)), "digits", "1", calibration, 1000
        )
        t0 = time.perf_counter()
        for _ in range(n):
            log.record(new_request_ids(1), decisions)
        on_loop_us = (time.perf_counter() - t0) / n * 1e6
        assert asyncio.run(log.recorder.call(lambda store: store.count())) == n
        log.recorder.close()
    # baseline: the same loop without a store (the request id only)
    t0 = time.perf_counter()
    for _ in range(n):
        new_request_ids(1)
    bare_us = (time.perf_counter() - t0) / n * 1e6
    # the recorder thread's side: one transaction per burst, as it writes under load
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp), Retention(10**6, 1e9))
        rows = [Decision(f"r{i}", time.time(), "digits", "1", "coverage-0.9", "predict", 7, 0.999, 0.996)
                for i in range(n)]  # fmt: skip
        t0 = time.perf_counter()
        for start in range(0, n, burst):
            store.record(rows[start : start + burst])
        write_rate = n / (time.perf_counter() - t0)
        store.close()
    return on_loop_us - bare_us, write_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="off/on pairs of fresh servers")
    parser.add_argument("--seconds", type=float, default=6.0, help="load duration per run")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.digits import load_digits  # no scikit-learn needed

    body = {"pixels": load_digits("test").x[0].tolist()}
    pairs = []
    for i in range(args.pairs):
        first = "off" if i % 2 == 0 else "sqlite"
        result = run_pair(args.workers, args.seconds, args.concurrency, body, first)
        pairs.append(result)
        off, on = result["off"], result["sqlite"]
        print(f"pair {i + 1} ({first} started first): off {off['rps']:.0f} req/s p50 {off['p50']:.1f} ms, "
              f"on {on['rps']:.0f} req/s p50 {on['p50']:.1f} ms, ratio {on['rps'] / off['rps']:.3f}; "
              f"recorded {on['recorded']} of {on['answers']} answers", flush=True)  # fmt: skip

    def mean_std(values: list[float]) -> str:
        return (
            f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
            if len(values) > 1
            else f"{values[0]:.3f}"
        )

    def stat(store: str, key: str, fmt: str) -> str:
        values = [p[store][key] for p in pairs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"

    ratios = [p["sqlite"]["rps"] / p["off"]["rps"] for p in pairs]
    p50_ratios = [p["sqlite"]["p50"] / p["off"]["p50"] for p in pairs]
    mean_ratio = statistics.mean(ratios)
    # two standard errors either side of the mean ratio; "faster" is noise, not a gain
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("inf")
    low, high = mean_ratio - 2 * se, mean_ratio + 2 * se
    if low >= 0.95:
        verdict = f"**met**: the mean ratio's ±2 standard errors, [{low:.3f}, {high:.3f}], lie above 0.95"
    elif high < 0.95:
        verdict = f"**missed**: the mean ratio's ±2 standard errors, [{low:.3f}, {high:.3f}], lie below 0.95"
    else:
        verdict = (
            f"**not resolved by the end-to-end runs**: the mean ratio's ±2 standard errors, [{low:.3f}, "
            f"{high:.3f}], straddle 0.95 — this shared machine's noise is larger than the effect; the "
            "direct measurement below bounds it"
        )
    on_loop_us, write_rate = where_the_time_goes()
    # the CPU that recording takes at the measured "off" throughput, as a share of one core
    off_rps = statistics.mean(p["off"]["rps"] for p in pairs)
    cost_us = on_loop_us + 1e6 / write_rate
    share = cost_us * off_rps / 1e6
    print(
        f"recording on the event loop: {on_loop_us:.1f} µs per answer; SQLite {write_rate:,.0f} decisions/s"
    )
    errors = sum(p[s]["errors"] for p in pairs for s in p)
    unrecorded = sum(p["sqlite"]["answers"] + 1 - p["sqlite"]["recorded"] for p in pairs)  # +1: the warm-up
    rows = "\n".join(
        f"| {i + 1} | {'off' if i % 2 == 0 else 'on'} | {p['off']['rps']:.0f} | {p['sqlite']['rps']:.0f} | "
        f"{p['sqlite']['rps'] / p['off']['rps']:.3f} | {p['off']['p50']:.1f} / {p['sqlite']['p50']:.1f} | "
        f"{p['off']['p99']:.1f} / {p['sqlite']['p99']:.1f} |"
        for i, p in enumerate(pairs)
    )
    text = f"""## Decision store

`nice -n 10 python benchmarks/serve_store.py --pairs {args.pairs} --seconds {args.seconds:g} \
--concurrency {args.concurrency} --workers {args.workers}` — {args.pairs} pairs of fresh servers, one with
`ABSTAIN_STORE=off` and one recording every decision in the default SQLite store (WAL), load-tested at
the same time (so the shared machine's swings hit both alike), {args.concurrency} loopback clients each
sending single-image `POST /predict` for {args.seconds:g} s; embedded digits model, {args.workers} worker(s)
per server.

Machine: {platform.machine()}, {cpu_count()} CPU cores ({cpu_model()}), Python {platform.python_version()},
shared with other jobs while this ran; the load generator shares the cores with the server.

| pair | started first | off (req/s) | on (req/s) | on / off | p50 off / on (ms) | p99 off / on (ms) |
|---|---|---|---|---|---|---|
{rows}

Throughput on / off: **{mean_std(ratios)}** (mean ± std over pairs; p50 latency on / off
{mean_std(p50_ratios)}). Off: {stat("off", "rps", ".0f")} req/s, on: {stat("sqlite", "rps", ".0f")} req/s.
Target "on slower by at most 5 %": {verdict}. {errors} errors; every answer of the "on" runs was recorded
({unrecorded} missing).

Where the time goes: recording adds **{on_loop_us:.1f} µs** per answer on the event loop (a request id,
one row, appended to the recorder's buffer: no lock handed over, no thread woken); the recorder thread
wakes every 0.1 s and writes the buffer in one transaction, **{write_rate:,.0f} decisions/s** into SQLite
at 25 rows a transaction (≈ 250 answers/s), off the answer's path. An earlier version woke the thread
and committed once per answer (≈ 100 µs a row): back to back it measured 0.83 ± 0.08 of "off" — the
thread's wake-ups competed with the event loop for the GIL and the two cores.
Together, **{cost_us:.0f} µs of CPU per answer**: at the {off_rps:.0f} req/s measured here, {share:.2%} of one
core{" — inside 5 %" if share < 0.05 else " — above 5 %"}.
"""
    print(text)
    if not args.no_write:
        replace_section("Decision store", text)


if __name__ == "__main__":
    main()
