"""Helpers for tests that start real servers on 127.0.0.1 (``bentoml serve``, ``tritonserver``).

Servers run in their own process group and are always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from abstain.contract import InputSpec

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "digits" / "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` at ``/metrics`` whose labels include ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return metric_value(text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{(.*)\}})?\s+(\S+)$", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def bentoml_command(port: int, target: str = "abstain.serving.service:Abstain") -> list[str]:
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def service_env(bentoml_home: Path, **abstain: str | int | float) -> dict[str, str]:
    """The environment of a service process: the caller's, without its ``ABSTAIN_*`` settings,
    plus ``abstain`` as ``ABSTAIN_<NAME>`` and ``BENTOML_HOME=bentoml_home``.

    ``bentoml_home``: a folder the caller owns and removes (under pytest's ``tmp_path``, never a
    ``mkdtemp`` nobody deletes): each server needs its own, since ``bentoml serve`` empties
    ``$BENTOML_HOME/prometheus_multiproc_dir`` at start, so servers sharing one would wipe each
    other's metrics. Created here if missing.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTAIN_")}
    env["BENTOML_DO_NOT_TRACK"] = "true"
    bentoml_home.mkdir(parents=True, exist_ok=True)
    env["BENTOML_HOME"] = str(bentoml_home)
    env.update({f"ABSTAIN_{k.upper()}": str(v) for k, v in abstain.items()})
    return env


def pytriton_dir() -> Path | None:
    """``<site-packages>/pytriton/tritonserver`` of the ``nvidia-pytriton`` wheel, if installed."""
    try:
        import pytriton
    except ImportError:
        return None
    path = Path(pytriton.__file__).parent / "tritonserver"
    return path if (path / "bin" / "tritonserver").is_file() else None


def triton_backend_dir(tmp: Path) -> Path:
    """A ``--backend-directory`` with the Python backend and the stub for this Python version.

    The wheel keeps one stub per Python version apart from ``libtriton_python.so``; Triton
    looks for ``triton_python_backend_stub`` next to the library (as ``pytriton/triton.py`` does).
    """
    src = pytriton_dir()
    assert src is not None
    python = tmp / "backends" / "python"
    python.mkdir(parents=True)
    for item in (src / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copyfile(item, python / item.name)
    stub = python / "triton_python_backend_stub"
    shutil.copyfile(
        src / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / stub.name, stub
    )
    stub.chmod(0o755)
    return tmp / "backends"


def start_triton(
    repository: Path,
    tmp: Path,
    models: list[str],
    http: int | None = None,
    grpc: int | None = None,
    metrics_port: int | None = None,
) -> tuple[subprocess.Popen, int, int, Path]:
    """Start ``tritonserver`` on 127.0.0.1 (free ports unless given); return (process, http, grpc, log).

    ``metrics_port``: serve Triton's Prometheus ``/metrics`` there (off by default).
    """
    src = pytriton_dir()
    assert src is not None
    site = src.parents[1]
    env = dict(os.environ)
    # the wheel's bundled shared libraries, and this venv's packages for the Python-backend stub
    env["LD_LIBRARY_PATH"] = ":".join(
        filter(None, [str(site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")])
    )
    env["PYTHONPATH"] = ":".join(filter(None, [str(site), env.get("PYTHONPATH")]))
    http, grpc = http or free_port(), grpc or free_port()
    log = tmp / f"triton-{http}-{time.monotonic_ns()}.log"
    argv = [
        str(src / "bin" / "tritonserver"),
        "--model-repository",
        str(repository),
        "--backend-directory",
        str(backends if (backends := tmp / "backends").is_dir() else triton_backend_dir(tmp)),
        "--model-control-mode",
        "explicit",
        *[f"--load-model={m}" for m in models],
        "--http-address",
        "127.0.0.1",
        "--http-port",
        str(http),
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        str(grpc),
        "--allow-metrics",
        "false" if metrics_port is None else "true",
        *(
            []
            if metrics_port is None
            else ["--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port)]
        ),
        "--exit-timeout-secs",
        "5",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_ready(f"http://127.0.0.1:{http}/v2/health/ready", process, log)
    return process, http, grpc, log


def write_random_entry(repository: Path, spec: InputSpec, weight_scale: float) -> Path:
    """A calibrated model-repository entry for ``spec`` (e.g. 3×224×224) with random weights of
    ``weight_scale``: the shipped digits calibration re-pinned to this graph's sha256 (its
    thresholds serve; what the model decides does not matter to the tests that need it: request
    sizes, memory, the event loop). Returns the version directory."""
    import json

    from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME
    from abstain.io import sha256_file
    from tests import graph_factory

    version_dir = graph_factory.write_model_dir(repository, spec=spec, random_weight_scale=weight_scale)
    calibration = json.loads((MODEL_DIR / CALIBRATION_FILENAME).read_text())
    calibration["graph_sha256"] = sha256_file(version_dir / MODEL_FILENAME)
    (version_dir / CALIBRATION_FILENAME).write_text(json.dumps(calibration))
    return version_dir
