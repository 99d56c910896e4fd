"""End to end with real components: the BentoML service started as the serving image and
the Kubernetes ConfigMap start it (``bentoml serve abstain.serving.service:Abstain`` configured by
``ABSTAIN_*`` variables), scraped every second by a real Prometheus server that loads
deploy/prometheus/rules.yml. A bounded number of predictions goes in; Prometheus' decision
counters, the abstention-rate recording rule and the rejected-input rate must reflect
exactly what the service answered. Both servers bind 127.0.0.1 on free ports and are
always stopped.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from deploy_helpers import COUNTERS, DEPLOY, GAUGES, HISTOGRAMS, REPO, scaled_object_queries

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
START_TIMEOUT_S = 120  # bentoml with 2 workers on a busy 2-core machine
SETTLE_TIMEOUT_S = 30  # scrape (1 s) + rule evaluation (1 s), with slack


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers (bentoml forks workers)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(
    check: Callable[[], Any], timeout: float, what: str, process: subprocess.Popen, log: Path
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with the server log otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: process exited with {process.returncode}\n{log.read_text()[-3000:]}")
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout} s (last: {last!r})\n{log.read_text()[-3000:]}")


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _configmap_env() -> dict[str, str]:
    """The variables deploy/kubernetes/base/configmap.yaml gives the pods."""
    return yaml.safe_load((DEPLOY / "kubernetes" / "base" / "configmap.yaml").read_text())["data"]


def _deployment_container() -> dict:
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("abstain-service")
    port = _free_port()
    env = {
        **os.environ,
        **_configmap_env(),
        "ABSTAIN_MODEL_REPOSITORY": str(REPO / "models"),  # the image's /models
        "BENTOML_HOME": str(tmp / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    env.pop("ABSTAIN_MODEL_DIR", None)
    log = tmp / "bentoml.log"
    entrypoint = ["serve", "abstain.serving.service:Abstain", "--host", "127.0.0.1", "--port", str(port)]
    process = _start([sys.executable, "-m", "bentoml", *entrypoint], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
            START_TIMEOUT_S,
            "bentoml serve ready",
            process,
            log,
        )
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install Debian's `prometheus` package (see .ci/run)")
    tmp = tmp_path_factory.mktemp("prometheus")
    # deploy/prometheus/prometheus.yml with the Kubernetes DNS discovery swapped for the
    # service on 127.0.0.1, 1 s intervals, and no Alertmanager; the rules are the real file.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    config.pop("alerting", None)
    # only the abstain job: no Triton here (its job would only fail DNS discovery)
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] == "abstain"]
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [service.removeprefix("http://")]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = tmp / "prometheus.log"
    process = _start(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        dict(os.environ),
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(
            lambda: httpx.get(f"{url}/-/ready", timeout=5).status_code == 200,
            30,
            "prometheus ready",
            process,
            log,
        )
        # the first scrape must see the counters at zero (the service creates them at start)
        # before any traffic, so rate() over the window counts every decision sent below
        _wait_for(
            lambda: _query(url, 'up{job="abstain"} == 1') and _query(url, "abstain_decisions_total"),
            SETTLE_TIMEOUT_S,
            "first scrape of the service",
            process,
            log,
        )
        yield url
    finally:
        _stop(process)


def _query(prometheus: str, promql: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scalar(prometheus: str, promql: str) -> float | None:
    result = _query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def test_probe_paths_of_the_deployment_answer(service: str) -> None:
    container = _deployment_container()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(f"{service}{path}", timeout=5).status_code == 200, path


def test_prometheus_sees_the_traffic_sent(service: str, prometheus: str) -> None:
    from abstain.datasets import load_digits

    operating_point = _configmap_env()["ABSTAIN_OPERATING_POINT"]
    images = load_digits("test").x[:40]
    # digits plus uniform noise: noise is the kind of input the model should abstain on
    noise = np.random.default_rng(0).random((8, *images.shape[1:]), dtype=np.float32)
    batches = [images[i : i + 10] for i in range(0, len(images), 10)] + [noise]
    decisions: list[str] = []
    with httpx.Client(base_url=service, timeout=30) as client:
        for batch in batches:
            response = client.post("/predict", json={"pixels": batch.tolist()})
            assert response.status_code == 200, response.text
            assert response.json()["operating_point"] == operating_point  # from the ConfigMap
            decisions += [p["decision"] for p in response.json()["predictions"]]
        bad = client.post("/predict", json={"pixels": [[[0.5, 0.5]]]})  # wrong shape
        assert bad.status_code == 400, bad.text
    sent = {"predict": decisions.count("predict"), "abstain": decisions.count("abstain")}
    assert sum(sent.values()) == 48

    selector = f'operating_point="{operating_point}"'

    def counters_caught_up() -> bool:
        seen = {
            r["metric"]["decision"]: float(r["value"][1])
            for r in _query(prometheus, f"sum by (decision) (abstain_decisions_total{{{selector}}})")
        }
        return seen == {k: float(v) for k, v in sent.items()}

    def rules_caught_up() -> bool:
        rejected = _scalar(prometheus, 'abstain:rejected_inputs:rate5m{reason="bad_shape"}')
        ratio = _scalar(prometheus, f"abstain:abstention_rate:ratio_rate5m{{{selector}}}")
        return bool(rejected) and ratio is not None and ratio == pytest.approx(sent["abstain"] / 48, abs=1e-9)

    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not (counters_caught_up() and rules_caught_up()):
        assert time.monotonic() < deadline, (
            f"Prometheus did not reflect {sent} and one bad_shape rejection within {SETTLE_TIMEOUT_S} s: "
            f"{_query(prometheus, f'abstain_decisions_total{{{selector}}}')}, "
            f"{_query(prometheus, 'abstain:abstention_rate:ratio_rate5m')}, "
            f"{_query(prometheus, 'abstain_rejected_inputs_total')}"
        )
        time.sleep(0.5)

    # calibration's promise, as the alerts compare against it
    calibrated = _scalar(prometheus, f"abstain:abstention_rate:calibrated{{{selector}}}")
    assert calibrated is not None and 0.0 <= calibrated < 1.0
    assert _scalar(prometheus, 'sum(abstain_rejected_inputs_total{reason="bad_shape"})') == 1.0

    # after this traffic every family the rules and the dashboard read has been scraped
    # (histogram series exist only once observed)
    expected = set(COUNTERS) | set(GAUGES) | {f"{h}_bucket" for h in HISTOGRAMS}
    result = _query(prometheus, 'count by (__name__) ({__name__=~"abstain_.+"})')
    assert expected <= {r["metric"]["__name__"] for r in result}


def test_the_autoscaler_queries_read_the_real_service(service: str, prometheus: str) -> None:
    """The KEDA ScaledObject's queries (deploy/kubernetes/components/request-autoscaling) find the
    series of the real server: decisions per second after traffic, and the in-flight gauge of the
    inference endpoints (/predict and /v2 infer) but not of the probes."""
    from abstain.datasets import load_digits

    images = load_digits("test").x[:4]
    pixels = {
        "name": "pixels",
        "shape": list(images.shape),
        "datatype": "FP32",
        "data": images.ravel().tolist(),
    }
    with httpx.Client(base_url=service, timeout=30) as client:
        assert client.post("/predict", json={"pixels": images.tolist()}).status_code == 200
        assert client.post("/v2/models/digits/infer", json={"inputs": [pixels]}).status_code == 200
        assert client.get("/readyz").status_code == 200
    queries = scaled_object_queries()
    # the in-flight filter, to list which endpoints of the real server it selects
    selector = re.search(r"bentoml_service_request_in_progress\{([^}]*)\}", queries["requests-in-flight"])
    assert selector
    wanted = {"/predict", "/v2/models/digits/infer"}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        rate = _scalar(prometheus, queries["decisions-per-second"])
        in_flight = _scalar(prometheus, queries["requests-in-flight"])
        endpoints = {
            r["metric"]["endpoint"]
            for r in _query(prometheus, f"bentoml_service_request_in_progress{{{selector.group(1)}}}")
        }
        if rate and in_flight is not None and wanted <= endpoints:
            break
        assert time.monotonic() < deadline, f"autoscaler queries: {rate=}, {in_flight=}, {endpoints=}"
        time.sleep(0.5)
    assert rate > 0
    assert in_flight >= 0  # a gauge; nothing is in flight between requests
    # the real server's probes are there, and not selected
    probes = {
        r["metric"]["endpoint"]
        for r in _query(prometheus, 'bentoml_service_request_in_progress{job="abstain"}')
    }
    assert "/readyz" in probes
    assert not endpoints & {"/readyz", "/livez", "/metrics"}
