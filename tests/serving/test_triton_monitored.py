"""Abstention monitoring without the Python front door: the Triton ensemble (selective graph →
decision counter, ``serving/triton/ensemble.py``) on a real ``tritonserver`` with metrics on,
scraped by a real Prometheus that loads ``deploy/prometheus/rules.yml``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from abstain.contract import ACCEPT_NAME, INPUT_NAME
from abstain.serving.triton.ensemble import write_monitored_ensemble
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, free_port, metric_value, pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository

pytestmark = [pytest.mark.server, pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton")]

SELECTIVE_DIR = MODEL_DIR.parents[1] / f"{MODEL_DIR.parent.name}-selective" / MODEL_DIR.name
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = shutil.which("prometheus")
POINT = "coverage-0.9"


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, str]]:
    """(http port, metrics port, ensemble name) of a Triton serving the monitored ensemble."""
    tmp = tmp_path_factory.mktemp("triton-monitored")
    repo = tmp / "repository"
    write_python_backend_repository(SELECTIVE_DIR, repo)
    ensemble = write_monitored_ensemble(SELECTIVE_DIR, repo)
    counter = f"abstain-decision-counter-{SELECTIVE_DIR.parent.name}"
    metrics = free_port()
    process, http, _grpc, _log = start_triton(
        repo, tmp, [SELECTIVE_DIR.parent.name, counter, ensemble], metrics_port=metrics
    )
    yield http, metrics, ensemble
    stop(process)


def _send(http: int, ensemble: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as client_lib

    client = client_lib.InferenceServerClient(f"127.0.0.1:{http}")
    inp = client_lib.InferInput(INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    result = client.infer(ensemble, [inp], outputs=[client_lib.InferRequestedOutput(ACCEPT_NAME)])
    return result.as_numpy(ACCEPT_NAME)


def _counts(metrics: int, point: str) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    labels = {"model": "digits", "version": MODEL_DIR.name, "operating_point": point}
    return {
        d: metric_value(text, "abstain_decisions_total", decision=d, **labels) for d in ("predict", "abstain")
    }


def test_triton_metrics_count_the_decisions_sent(triton: tuple[int, int, str]) -> None:
    http, metrics, ensemble = triton
    before = _counts(metrics, POINT)
    x = load_digits("test").x[:100]
    accept = _send(http, ensemble, x)
    col = ["coverage-0.8", "coverage-0.9", "coverage-0.95", "risk-0.05"].index(POINT)
    after = _counts(metrics, POINT)
    assert after["predict"] - before["predict"] == accept[:, col].sum()
    assert after["abstain"] - before["abstain"] == (~accept[:, col]).sum() > 0
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    assert metric_value(text, "abstain_target_coverage", operating_point=POINT) == 0.9


def test_prometheus_rule_computes_the_abstention_rate_sent(
    triton: tuple[int, int, str], tmp_path: Path
) -> None:
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install Debian's `prometheus` package (see .ci/run)")
    http, metrics, ensemble = triton
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    config.pop("alerting", None)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "abstain"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    selector = f'operating_point="{POINT}"'

    def query(promql: str) -> list[dict]:
        try:
            body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
        except (httpx.HTTPError, ValueError):  # not up yet: refused, or a non-JSON "not ready" page
            return []
        return body.get("data", {}).get("result", [])

    try:
        deadline = time.monotonic() + 30  # the first scrape sees the counters before the traffic
        while not query(f"abstain_decisions_total{{{selector}}}") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert query(f"abstain_decisions_total{{{selector}}}"), (tmp_path / "prometheus.log").read_text()[
            -2000:
        ]
        x = load_digits("test").x
        accept = np.concatenate([_send(http, ensemble, x[i : i + 90]) for i in range(0, len(x), 90)])
        sent = float((~accept[:, 1]).mean())
        deadline = time.monotonic() + 30
        ratio = None
        while time.monotonic() < deadline:
            result = query(f"abstain:abstention_rate:ratio_rate5m{{{selector}}}")
            ratio = float(result[0]["value"][1]) if result else None
            if ratio is not None and abs(ratio - sent) < 1e-9:
                break
            time.sleep(0.5)
        assert ratio == pytest.approx(sent, abs=1e-9), (ratio, sent)
        calibrated = query(f"abstain:abstention_rate:calibrated{{{selector}}}")
        assert float(calibrated[0]["value"][1]) == pytest.approx(0.1)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
