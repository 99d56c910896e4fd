"""Where one `abstain serve` worker spends its time under load: a sampling profile by component.

Run: ``python benchmarks/serve_profile.py [--seconds 15] [--connections 8]`` (needs ``py-spy``,
``pip install py-spy``, and Debian's ``wrk``; root or ptrace rights to sample the worker).

It starts ``abstain serve`` on the shipped digits model with one worker, drives it with ``wrk``
(single-image JSON, and the same image as ``.npy``) from 127.0.0.1, and samples the worker with
``py-spy record --format raw`` (collapsed stacks, native frames off; only threads that are
running, not blocked in a system call: uvloop waits for sockets inside its C code, where no
Python frame could tell the wait from the work). Each
sample is charged to the first frame of its stack, from the leaf up, that belongs to a known
component (ONNX Runtime, our code, BentoML, Starlette, uvicorn/h11, Prometheus client, JSON,
asyncio's loop, idle waiting), so the table says what share of the worker's time each layer takes
for one request. Writes the "Serving: where the time goes" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_count, cpu_model, replace_section
from serve_peers import LUA, REPO, npy_bytes, start_bentoml, stop, wrk

HEADING = "Serving: where the time goes"
#: Where to keep py-spy's raw stacks (``--keep DIR``), for a flame graph or a closer look.
KEEP: Path | None = None
#: (component, substrings of a frame "function (file:line)"), checked in order from the leaf up.
COMPONENTS = [
    (
        "idle (waiting for work: selector, queues, locks)",
        (
            "select (selectors.py",
            "epoll",
            "wait (threading.py",
            "_worker (concurrent/futures",
            "get (queue.py",
        ),
    ),
    ("ONNX Runtime (the graph)", ("onnxruntime",)),
    ("abstain: middlewares, validation, decisions, metrics, batching", ("(serving/", "(abstain/")),
    ("Prometheus client", ("prometheus_client",)),
    ("JSON encode/decode", ("json/", "orjson", "pydantic")),
    ("BentoML", ("bentoml",)),
    ("Starlette / ASGI", ("starlette", "anyio")),
    ("uvicorn / h11 (HTTP)", ("uvicorn", "h11", "httptools")),
    ("asyncio event loop", ("asyncio",)),
]


#: Leaf frames whose samples are C code under them: uvloop's loop (its socket reads and callbacks
#: run under ``Runner.run``) and uvicorn's ``transport.write`` of an answer (a send(2) that, on
#: 127.0.0.1, also runs the receiving side of TCP in the kernel).
SOCKET_IO = "event loop and socket I/O in C (uvloop, send/recv)"
SOCKET_LEAVES = ("Runner.run (asyncio/runners.py", "RequestResponseCycle.send (uvicorn/protocols/http/")


def classify(stack: str) -> str:
    frames = stack.split(";")[::-1]  # leaf first
    if frames[0].startswith(SOCKET_LEAVES):
        return SOCKET_IO
    for frame in frames:
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return "other Python"


def worker_pid(server: subprocess.Popen) -> int:
    """The service worker: the child process that loaded onnxruntime."""
    for child in psutil.Process(server.pid).children(recursive=True):
        try:
            if any("onnxruntime" in m.path for m in child.memory_maps()):
                return child.pid
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    raise RuntimeError("no worker process with onnxruntime loaded")


def profile(
    url: str, pid: int, body: Path, ctype: str, seconds: float, connections: int, lua: Path, out: Path
) -> tuple[collections.Counter, float]:
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    point = wrk(f"{url}/predict", body, ctype, connections, seconds - 2, lua)
    spy.wait(timeout=seconds + 30)
    if KEEP is not None:
        KEEP.mkdir(parents=True, exist_ok=True)
        (KEEP / out.name).write_text(out.read_text())
    counts: collections.Counter = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[classify(stack)] += int(n)
    return counts, point.rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--keep", type=Path, default=None, help="keep py-spy's raw stacks in this folder")
    args = parser.parse_args()
    global KEEP
    KEEP = args.keep
    from abstain.datasets import load_digits

    x = load_digits("test").x[:1]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "post.lua"
        lua.write_text(LUA)
        (tmp / "one.json").write_text(json.dumps({"pixels": x.tolist()}))
        (tmp / "one.npy").write_bytes(npy_bytes(x))
        server, url = start_bentoml(
            "abstain.serving.service:Abstain",
            {
                "ABSTAIN_MODEL_DIR": str(REPO / "models" / "digits"),
                "ABSTAIN_WORKERS": "1",
                "ABSTAIN_STORE": "off",
            },
            tmp / "server.log",
        )
        try:
            pid = worker_pid(server)
            results = {}
            for label, body, ctype in (
                ("JSON", tmp / "one.json", "application/json"),
                (".npy", tmp / "one.npy", "application/x-npy"),
            ):
                results[label] = profile(
                    url, pid, body, ctype, args.seconds, args.connections, lua, tmp / f"{label}.txt"
                )
        finally:
            stop(server)
        # the 64-image .npy point of serve_peers.py, with the decision store on (the default)
        (tmp / "64.npy").write_bytes(npy_bytes(load_digits("test").x[:64]))
        server, url = start_bentoml(
            "abstain.serving.service:Abstain",
            {"ABSTAIN_MODEL_DIR": str(REPO / "models" / "digits"), "ABSTAIN_WORKERS": "1"},
            tmp / "server64.log",
        )
        try:
            label = "64-image .npy, store on, 2 conn."
            results[label] = profile(
                url,
                worker_pid(server),
                tmp / "64.npy",
                "application/x-npy",
                args.seconds,
                2,
                lua,
                tmp / "64.txt",
            )
        finally:
            stop(server)
    idle = COMPONENTS[0][0]
    names = [SOCKET_IO] + [name for name, _ in COMPONENTS[1:]] + ["other Python"]
    lines = [
        f"## {HEADING}",
        "",
        f"`python benchmarks/serve_profile.py --seconds {args.seconds:g} --connections {args.connections}` — "
        "`abstain serve` (digits, 1 worker, decision store off) under `wrk` single-image requests from "
        f"{args.connections} connections, then (decision store on, as by default) 64-image `.npy` requests "
        "from 2 connections; its worker's threads sampled by `py-spy` at 200 Hz. A sample is "
        "charged to the first frame, from the leaf up, that belongs to a component; the shares are of the "
        "samples py-spy takes of running threads (blocked ones are left out; those still in a wait frame "
        "are counted apart, as idle).",
        f"Machine: {platform.machine()}, {cpu_count()} CPU cores ({cpu_model()}), Python "
        f"{platform.python_version()}; the load generator shares the cores.",
        "",
        "| component (share of busy samples) | "
        + " | ".join(f"{k} ({v[1]:,.0f} rps)" for k, v in results.items())
        + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in names:
        cells = []
        for counts, _ in results.values():
            busy = (sum(counts.values()) - counts[idle]) or 1
            cells.append(f"{100 * counts[name] / busy:.1f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| (idle samples, all threads, as a share of all samples) | "
        + " | ".join(f"{100 * c[idle] / (sum(c.values()) or 1):.0f} %" for c, _ in results.values())
        + " |"
    )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    replace_section(HEADING, text)


if __name__ == "__main__":
    main()
