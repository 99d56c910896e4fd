"""`abstain serve` measured side by side with what an operator would otherwise deploy.

One command, one run, the same graphs for every server:

* graphs: the shipped digits model, and a CIFAR-size VGG-16-BN (3×32×32, 100 classes, random
  weights) made with the project's own ``abstain export`` and ``abstain calibrate``;
* servers: raw ONNX Runtime in-process (the limit, no HTTP), Triton direct (the
  ``nvidia-pytriton`` tritonserver the tests use, Python-backend model running ONNX Runtime,
  dynamic batching; KServe v2 JSON), a plain BentoML service that only runs the graph
  (``benchmarks/plain_service.py``, the framework floor), and ``abstain serve`` with JSON and
  with ``.npy`` bodies;
* load: ``wrk`` (Debian) with a Lua script on 127.0.0.1, 1 / 8 / 32 connections of
  single-image requests, then requests of 64 images at 2 connections; every point repeated
  ``--repeats`` times, the median reported (single runs vary by up to a third here), abstain's
  JSON and ``.npy`` runs interleaved on one server so that drift falls on both alike;
* a soak of ``abstain serve`` (.npy, 32 connections) for ``--soak`` seconds: worst latency,
  p99 and the worker's resident memory before and after.

It writes the "Serving against its peers" section of docs/benchmarks.md (machine, command,
tables). Needs torch (for the VGG export) and nvidia-pytriton (for Triton; skipped without).

    nice -n 10 python benchmarks/serve_peers.py                  # ≈ 17 min on 2 cores
    nice -n 10 python benchmarks/serve_peers.py --v2-only --graphs vgg --seconds 10 --repeats 9 \
        --many-seconds 20                                         # the v2 path alone, ≈ 8 min

The load generator shares the machine's cores with the servers: the figures compare servers
with each other on this machine, they are not a capacity figure for a dedicated host.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.serving.servers: how the tests start tritonserver
sys.path.insert(0, str(REPO / "benchmarks"))

from report import cpu_count, cpu_model, replace_section  # noqa: E402

from abstain.runtime import OnnxModel  # noqa: E402
from tests.serving.servers import free_port, pytriton_dir, start_triton, stop  # noqa: E402
from tests.serving.triton_repository import write_python_backend_repository  # noqa: E402

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
-- the Open Inference Protocol's binary extension: the JSON header's length
local header = os.getenv("WRK_INFERENCE_HEADER_LENGTH")
if header and header ~= "" then wrk.headers["Inference-Header-Content-Length"] = header end
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
"""


#: abstain with one worker per usable CPU (the default is one worker using all of them)
WORKERS_ROW = f"abstain JSON, {cpu_count()} workers"


@dataclass
class Point:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


#: content type of a binary-extension body; its JSON header's length travels in the body's file name
V2_BINARY = "application/octet-stream"


def wrk(url: str, body: Path, content_type: str, connections: int, seconds: float, lua: Path) -> Point:
    """One wrk run (one thread: the load generator must not take both cores)."""
    env = dict(os.environ, WRK_BODY=str(body), WRK_CONTENT_TYPE=content_type)
    if content_type == V2_BINARY:  # <name>.h<header length>.bin, written by v2_binary_body
        env["WRK_INFERENCE_HEADER_LENGTH"] = body.suffixes[-2][2:]
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(lua),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    out = done.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk failed on {url}: {out[-1000:]} {done.stderr[-1000:]}")
    rps = float(found.group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    worst = _ms(re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    n = int(non2xx.group(1)) if non2xx else 0
    if errors:
        n += sum(int(v) for v in re.findall(r"\d+", errors.group(0)))
    return Point(rps, p50, p99, worst, n)


def median_point(points: list[Point]) -> Point:
    return Point(
        statistics.median(p.rps for p in points),
        statistics.median(p.p50_ms for p in points),
        statistics.median(p.p99_ms for p in points),
        max(p.max_ms for p in points),
        sum(p.non2xx for p in points),
    )


def start_bentoml(
    target: str, env_extra: dict[str, str], log: Path, cwd: Path = REPO
) -> tuple[subprocess.Popen, str]:
    """``bentoml serve target`` run in ``cwd`` (its working directory comes first on ``sys.path``)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTAIN_")}
    env.update(
        BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=tempfile.mkdtemp(prefix="peers-bentoml-"), **env_extra
    )
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{target} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"{target} not ready: {log.read_text()[-2000:]}")


def worker_rss_mib(process: subprocess.Popen) -> float:
    import psutil

    return max(p.memory_info().rss for p in psutil.Process(process.pid).children(recursive=True)) / 2**20


def make_vgg(tmp: Path) -> Path:
    """A VGG-16-BN 3×32×32, 100 classes, random weights: ``abstain export`` then ``abstain calibrate``."""
    import torch

    from abstain.contract import InputSpec
    from abstain.training.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from abstain.training.model import ModelConfig, SelectiveNet

    torch.manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    config = ModelConfig(body="vgg16_bn", num_classes=100, in_channels=3, image_size=32, mean=mean, std=std)
    model = SelectiveNet(config)
    save_checkpoint(
        tmp / "vgg.pt",
        {
            "format": CHECKPOINT_FORMAT,
            "model_config": config.to_dict(),
            "state_dict": model.state_dict(),
            "class_names": [f"class_{i}" for i in range(100)],
            "input_spec": InputSpec(3, 32, 32, mean, std).to_dict(),
            "train_config": {"loss": "sync", "beta": 1.0, "target_coverage": 0.8, "dataset": "random"},
            "data_fingerprint": "0" * 64,
            "metrics": {"split": "none", "accuracy": 0.01},
            "code_version": "benchmark",
            "epoch": 0,
        },
    )
    repo = tmp / "models"
    run = [sys.executable, "-m", "abstain"]
    subprocess.run(
        [*run, "export", str(tmp / "vgg.pt"), "--name", "vgg", "--repository", str(repo)],
        check=True,
        capture_output=True,
    )
    rng = np.random.default_rng(0)
    np.savez(tmp / "cal.npz", x=rng.random((2000, 3, 32, 32), dtype=np.float32), y=rng.integers(0, 100, 2000))
    subprocess.run(
        [*run, "calibrate", str(repo / "vgg"), "--data", str(tmp / "cal.npz"), "--coverage", "0.8"],
        check=True,
        capture_output=True,
    )
    return repo / "vgg" / "1"


def v2_binary_body(x: np.ndarray) -> tuple[bytes, int]:
    """An Open Inference Protocol request for ``x`` as ``tritonclient.http`` sends it by default:
    the pixels in the binary extension, every output asked for in binary; ``(body, header length)``."""
    import tritonclient.http as triton_http

    pixels = triton_http.InferInput("pixels", list(x.shape), "FP32")
    pixels.set_data_from_numpy(x, binary_data=True)
    # no outputs named: tritonclient asks for all of them in binary (binary_data_output)
    body, header = triton_http.InferenceServerClient.generate_request_body([pixels])
    return body, int(header or 0)


def triton_config(config: str, delay_us: int, preferred: tuple[int, ...], threads: int) -> str:
    """A Python-backend ``config.pbtxt`` with this dynamic batching and ONNX Runtime thread count."""
    batching = f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n"
    if preferred:
        batching += f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
    batching += "}\n"
    config = re.sub(r"dynamic_batching\s*\{[^}]*\}\s*", batching, config)
    return config + f'parameters: {{ key: "intra_op_threads" value: {{ string_value: "{threads}" }} }}\n'


#: The Triton settings swept before Triton is compared with (a user tunes the peer first):
#: queue delay (µs) x preferred batch sizes x ONNX Runtime threads in the Python-backend stub.
TRITON_SWEEP = [
    (delay, preferred, threads)
    for delay in (0, 500, 2000, 5000)
    for preferred in ((), (8, 16, 32))
    for threads in (1, 2)
]


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def raw_ort(version_dir: Path, x: np.ndarray, seconds: float) -> dict[int, float]:
    """Images/s of ONNX Runtime in this process at batch 1, 32 and 64 (all usable cores)."""
    model = OnnxModel(version_dir / "model.onnx", prefer_cuda=False)
    rates = {}
    for batch in (1, 32, 64):
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        model.run(xb)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.run(xb)
            n += batch
        rates[batch] = n / (time.perf_counter() - t0)
    return rates


def bench_graph(name: str, version_dir: Path, tmp: Path, args: argparse.Namespace, lua: Path) -> dict:
    """Every server and load point on one graph; returns the medians."""
    spec = OnnxModel(version_dir / "model.onnx", prefer_cuda=False).input_spec
    rng = np.random.default_rng(1)
    x1 = rng.random((1, *spec.shape), dtype=np.float32)
    x64 = rng.random((64, *spec.shape), dtype=np.float32)
    bodies = tmp / name
    bodies.mkdir()

    def write(fname: str, data: bytes) -> Path:
        (bodies / fname).write_bytes(data)
        return bodies / fname

    json1 = write("one.json", json.dumps({"pixels": x1[0].tolist()}).encode())
    json64 = write("64.json", json.dumps({"pixels": x64.tolist()}).encode())
    npy1, npy64 = write("one.npy", npy_bytes(x1[0])), write("64.npy", npy_bytes(x64))

    def kserve(x: np.ndarray) -> bytes:
        return json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.reshape(-1).tolist(),
                    }
                ]
            }
        ).encode()

    tr1, tr64 = write("triton1.json", kserve(x1)), write("triton64.json", kserve(x64))
    (b1, h1), (b64, h64) = v2_binary_body(x1), v2_binary_body(x64)
    v2_1, v2_64 = write(f"v2-one.h{h1}.bin", b1), write(f"v2-64.h{h64}.bin", b64)
    results: dict = {"raw": raw_ort(version_dir, x64, args.seconds)}
    print(f"[{name}] raw ONNX Runtime img/s: {results['raw']}", flush=True)

    def measure(url: str, *series: tuple[str, Path, Path, str] | tuple[str, Path, Path, str, str]) -> None:
        """Every point of each ``(label, one-image body, 64-image body, content type[, URL])`` series
        on one server (``url`` unless the series names its own); several series run interleaved,
        repeat by repeat, so that a drift of the machine or the server over the minutes of a run
        falls on all alike (JSON against .npy against the v2 binary path)."""
        for c in (1, 8, 32, 64):
            points: dict[str, list[Point]] = {item[0]: [] for item in series}
            for _ in range(args.repeats):
                for label, one, many, ctype, *own in series:
                    target = own[0] if own else url
                    if c == 64:  # 64-image requests take long on a big graph: 2 connections, longer runs
                        points[label].append(
                            wrk(target, many, ctype, 2, max(args.seconds, args.many_seconds), lua)
                        )
                    else:
                        points[label].append(wrk(target, one, ctype, c, args.seconds, lua))
            for label in points:
                results[(label, c)] = median_point(points[label])
                where = "64 img c=2" if c == 64 else f"c={c:<3d}"
                print(f"[{name}] {label:14s} {where} {results[(label, c)]}", flush=True)

    if pytriton_dir() is not None:
        model = version_dir.parent.name

        def start(setting: tuple[int, tuple[int, ...], int]) -> tuple[subprocess.Popen, str]:
            repo = tmp / f"triton-{name}-{len(list(tmp.glob(f'triton-{name}-*')))}"
            entry = write_python_backend_repository(version_dir, repo)
            config = entry / "config.pbtxt"
            config.write_text(triton_config(config.read_text(), *setting))
            triton, http, _grpc, _log = start_triton(repo, tmp, [model])
            return triton, f"http://127.0.0.1:{http}/v2/models/{model}/versions/{version_dir.name}/infer"

        # tuned as a user would before comparing: every setting at 32 single-image clients, the
        # best kept (one run each: the sweep picks, the measurement below reports)
        sweep = {}
        for setting in TRITON_SWEEP:
            triton, url = start(setting)
            try:
                sweep[setting] = wrk(url, tr1, "application/json", 32, args.seconds, lua)
            finally:
                stop(triton)
            print(f"[{name}] Triton sweep {setting}: {sweep[setting]}", flush=True)
        best = max(sweep, key=lambda s: sweep[s].rps)
        results["triton sweep"], results["triton best"] = sweep, best
        triton, url = start(best)
        try:
            measure(url, ("Triton direct", tr1, tr64, "application/json"))
        finally:
            stop(triton)
    plain, url = start_bentoml(
        "benchmarks.plain_service:Plain",
        {"PLAIN_GRAPH": str(version_dir / "model.onnx")},
        tmp / f"plain-{name}.log",
    )
    try:
        measure(f"{url}/predict", ("plain BentoML", json1, json64, "application/json"))
    finally:
        stop(plain)
    service, url = start_bentoml(
        "abstain.serving.service:Abstain",
        {"ABSTAIN_MODEL_DIR": str(version_dir), "ABSTAIN_MAX_CONCURRENCY": "1000"},
        tmp / f"abstain-{name}.log",
    )
    try:
        v2_url = f"{url}/v2/models/{version_dir.parent.name}/infer"
        measure(
            f"{url}/predict",
            ("abstain JSON", json1, json64, "application/json"),
            ("abstain .npy", npy1, npy64, "application/x-npy"),
            # the Open Inference Protocol's binary path (tritonclient.http's default), same server
            ("abstain v2 binary", v2_1, v2_64, V2_BINARY, v2_url),
        )
        if name == "digits" and args.soak > 0:
            rss0 = worker_rss_mib(service)
            soak = wrk(f"{url}/predict", npy1, "application/x-npy", 32, args.soak, lua)
            results["soak"] = (soak, rss0, worker_rss_mib(service))
            rss1 = results["soak"][2]
            print(f"[{name}] soak {args.soak:.0f} s: {soak}, worker RSS {rss0:.0f} -> {rss1:.0f} MiB")
    finally:
        stop(service)
    # the default of one worker against one per usable CPU (each with that share of ORT threads)
    service, url = start_bentoml(
        "abstain.serving.service:Abstain",
        {
            "ABSTAIN_MODEL_DIR": str(version_dir),
            "ABSTAIN_MAX_CONCURRENCY": "1000",
            "ABSTAIN_WORKERS": str(cpu_count()),
        },
        tmp / f"abstain-workers-{name}.log",
    )
    try:
        measure(f"{url}/predict", (WORKERS_ROW, json1, json64, "application/json"))
    finally:
        stop(service)
    # what the decision store (SQLite, on by default) costs: the 64-image point without it
    service, url = start_bentoml(
        "abstain.serving.service:Abstain",
        {"ABSTAIN_MODEL_DIR": str(version_dir), "ABSTAIN_MAX_CONCURRENCY": "1000", "ABSTAIN_STORE": "off"},
        tmp / f"abstain-nostore-{name}.log",
    )
    try:
        pts = [
            wrk(f"{url}/predict", npy64, "application/x-npy", 2, max(args.seconds, args.many_seconds), lua)
            for _ in range(args.repeats)
        ]
        results["npy64 store off"] = median_point(pts)
        print(f"[{name}] abstain .npy, store off, 64 img c=2 {results['npy64 store off']}", flush=True)
    finally:
        stop(service)
    return results


def v2_against_npy(name: str, version_dir: Path, tmp: Path, args: argparse.Namespace, lua: Path) -> list[str]:
    """``--v2-only``: abstain's v2 binary path against its own ``.npy`` path alone, on one server:
    ``--repeats`` pairs of interleaved runs at one client (``--seconds`` each) and at 2 × 64-image
    (``--many-seconds`` each), the median of each series and of the paired ratios."""
    spec = OnnxModel(version_dir / "model.onnx", prefer_cuda=False).input_spec
    rng = np.random.default_rng(1)
    bodies = tmp / f"{name}-v2"
    bodies.mkdir()
    series = {}
    for label, x in (("1", rng.random((1, *spec.shape), dtype=np.float32)),
                     ("64", rng.random((64, *spec.shape), dtype=np.float32))):  # fmt: skip
        npy = bodies / f"{label}.npy"
        npy.write_bytes(npy_bytes(x[0] if label == "1" else x))
        body, header = v2_binary_body(x)
        v2 = bodies / f"v2-{label}.h{header}.bin"
        v2.write_bytes(body)
        series[label] = (npy, v2)
    service, url = start_bentoml(
        "abstain.serving.service:Abstain",
        {"ABSTAIN_MODEL_DIR": str(version_dir), "ABSTAIN_MAX_CONCURRENCY": "1000"},
        tmp / f"abstain-{name}-v2.log",
    )
    v2_url = f"{url}/v2/models/{version_dir.parent.name}/infer"
    lines = []
    try:
        for label, connections, seconds in (("1", 1, args.seconds), ("64", 2, args.many_seconds)):
            npy, v2 = series[label]
            wrk(f"{url}/predict", npy, "application/x-npy", connections, 2, lua)  # warm both paths
            wrk(v2_url, v2, V2_BINARY, connections, 2, lua)
            pairs = [
                (
                    wrk(f"{url}/predict", npy, "application/x-npy", connections, seconds, lua),
                    wrk(v2_url, v2, V2_BINARY, connections, seconds, lua),
                )
                for _ in range(args.repeats)
            ]
            n_rps = statistics.median(a.rps for a, _ in pairs)
            v_rps = statistics.median(b.rps for _, b in pairs)
            ratios = [b.rps / a.rps for a, b in pairs]
            errors = sum(a.non2xx + b.non2xx for a, b in pairs)
            point = "one client" if label == "1" else "2 × 64-image"
            lines.append(
                f"{name}, {point} ({args.repeats} pairs of {seconds:g}-s runs): .npy {n_rps:,.2f} rps, v2 "
                f"binary {v_rps:,.2f} rps, ratio of medians **{v_rps / n_rps:.3f}**; paired ratios median "
                f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
                f"{errors} non-2xx."
            )
            print(lines[-1], flush=True)
    finally:
        stop(service)
    return lines


def table(name: str, r: dict) -> list[str]:
    servers = [
        s
        for s in (
            "Triton direct",
            "plain BentoML",
            "abstain JSON",
            "abstain .npy",
            "abstain v2 binary",
            WORKERS_ROW,
        )
        if (s, 1) in r
    ]
    raw = r["raw"]
    lines = [
        f"**{name}** — raw ONNX Runtime in-process: {raw[1]:,.0f} img/s at batch 1, {raw[32]:,.0f} at 32, "
        f"{raw[64]:,.0f} at 64.",
        "",
        "| server | clients | rps | img/s | p50 ms | p99 ms | max ms | non-2xx | × Triton rps "
        "| × raw ORT img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        for c in (1, 8, 32, 64):
            p = r[(s, c)]
            images = 64 if c == 64 else 1
            ref = r.get(("Triton direct", c))
            vs_triton = f"{p.rps / ref.rps:.2f}" if ref else "–"
            vs_raw = p.rps * images / raw[64 if c == 64 else 1]
            label = "2 × 64-image" if c == 64 else str(c)
            lines.append(
                f"| {s} | {label} | {p.rps:,.0f} | {p.rps * images:,.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | "
                f"{p.max_ms:.1f} | {p.non2xx} | {vs_triton} | {vs_raw:.2f} |"
            )
    return lines


def triton_sweep_lines(name: str, r: dict) -> list[str]:
    """The Triton settings tried on ``name`` (32 single-image clients, one run each), best first."""
    if "triton sweep" not in r:
        return []
    sweep, best = r["triton sweep"], r["triton best"]
    lines = [
        f"Triton tuned on {name} before the comparison: every setting at 32 single-image clients "
        "(one run each), the best kept for the table above.",
        "",
        "| max_queue_delay µs | preferred_batch_size | ORT threads in the stub | rps |",
        "|---|---|---|---|",
    ]
    for setting in sorted(sweep, key=lambda k: -sweep[k].rps):
        delay, preferred, threads = setting
        mark = " (kept)" if setting == best else ""
        pref = ", ".join(map(str, preferred)) or "none"
        lines.append(f"| {delay} | {pref} | {threads} | {sweep[setting].rps:,.0f}{mark} |")
    return lines


def v2_ratio_line(name: str, r: dict) -> str:
    """The v2 binary path against abstain's own .npy path, per load point (target >= 0.9)."""
    ratios = [r[("abstain v2 binary", c)].rps / r[("abstain .npy", c)].rps for c in (1, 8, 32, 64)]
    met = "met" if min(ratios) >= 0.9 else "NOT met"
    return (
        f"{name}: abstain's Open Inference Protocol binary path against its own `.npy` path, rps ratio "
        f"at 1 / 8 / 32 clients and 2 × 64-image: {' / '.join(f'{x:.2f}' for x in ratios)} "
        f"(target ≥ 0.9 everywhere: {met})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per point (median reported)")
    parser.add_argument("--soak", type=int, default=180, help="soak seconds (0: none)")
    parser.add_argument(
        "--many-seconds",
        type=int,
        default=6,
        help="seconds per 64-image run (VGG answers ~1 such request a second here: 6 s hold ~7)",
    )
    parser.add_argument("--graphs", default="digits,vgg", help="comma-separated: digits, vgg")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument(
        "--v2-only",
        action="store_true",
        help="only abstain's v2 binary path against its .npy path (one client, 2 × 64-image); prints, "
        "writes nothing",
    )
    args = parser.parse_args()
    started = time.monotonic()
    if args.v2_only:
        with tempfile.TemporaryDirectory(prefix="serve-peers-") as name:
            tmp = Path(name)
            (lua := tmp / "post.lua").write_text(LUA)
            graphs = {"digits": REPO / "models" / "digits" / "1"}
            if "vgg" in args.graphs:
                graphs["vgg"] = make_vgg(tmp)
            for g, d in graphs.items():
                if g in args.graphs:
                    v2_against_npy(g, d, tmp, args, lua)
        print(f"{(time.monotonic() - started) / 60:.1f} min")
        return
    with tempfile.TemporaryDirectory(prefix="serve-peers-") as name:
        tmp = Path(name)
        lua = tmp / "post.lua"
        lua.write_text(LUA)
        graphs = {"digits": REPO / "models" / "digits" / "1"}
        if "vgg" in args.graphs:
            graphs["vgg"] = make_vgg(tmp)
        results = {g: bench_graph(g, d, tmp, args, lua) for g, d in graphs.items() if g in args.graphs}
    minutes = (time.monotonic() - started) / 60
    command = "nice -n 10 python benchmarks/serve_peers.py " + shlex.join(sys.argv[1:])
    lines = [
        "## Serving against its peers",
        "",
        f"Machine: {cpu_model()}, {cpu_count()} usable CPUs, no GPU; load generator `wrk` (1 thread) on "
        f"127.0.0.1 sharing those CPUs. Command: `{command.strip()}` ({minutes:.1f} min). Each point: "
        f"{args.repeats} runs of {args.seconds:g} s, median rps / p50 / p99, worst max, summed non-2xx; "
        "abstain's JSON and .npy runs alternate on one server. "
        "Single-image requests at 1 / 8 / 32 connections; `2 × 64-image`: 2 connections sending "
        f"64-image requests (runs of at least {args.many_seconds} s). Triton: nvidia-pytriton's "
        "tritonserver, "
        "Python-backend ONNX Runtime model, dynamic batching tuned first (below), KServe v2 JSON. "
        "abstain: defaults (1 worker, decision store on), except the last rows: one worker per usable "
        "CPU; `abstain v2 binary` is its `/v2/models/<name>/infer` with the binary tensor extension, "
        "as `tritonclient.http` sends it.",
        "",
    ]
    for g, r in results.items():
        lines += [*table(g, r), "", v2_ratio_line(g, r), ""]
        if "triton sweep" in r:
            lines += [*triton_sweep_lines(g, r), ""]
        off = r["npy64 store off"]
        lines += [
            f"Without the decision store (`ABSTAIN_STORE=off`), {g}'s 2 × 64-image `.npy` point: "
            f"{off.rps:,.0f} rps, {off.rps * 64:,.0f} img/s ({off.rps * 64 / r['raw'][64]:.2f}× raw ORT at "
            f"batch 64), p99 {off.p99_ms:.2f} ms.",
            "",
        ]
        if "soak" in r:
            soak, rss0, rss1 = r["soak"]
            lines.append(
                f"Soak (digits, abstain .npy, 32 connections, {args.soak:g} s): {soak.rps:,.0f} rps, p99 "
                f"{soak.p99_ms:.2f} ms, worst {soak.max_ms:.1f} ms, {soak.non2xx} non-2xx; worker RSS "
                f"{rss0:.0f} → {rss1:.0f} MiB."
            )
            lines.append("")
    section = "\n".join(lines)
    print(section)
    if not args.no_doc:
        replace_section("Serving against its peers", section)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
