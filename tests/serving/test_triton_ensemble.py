"""Abstention monitoring without the front door: Triton's ensemble counts decisions on its ``/metrics``.

A real ``tritonserver`` (metrics on) serves the ensemble written by ``abstain triton-ensemble``
(selective graph -> Python-backend metrics step); a real Prometheus scrapes it with the real
``deploy/prometheus/rules.yml``. The counters must equal the decisions the client received, and
the recording rule ``abstain:abstention_rate:ratio_rate5m`` must equal the abstention rate sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import yaml

from abstain.contract import ACCEPT_NAME, CLASS_INDEX_NAME, INPUT_NAME, META_SELECTIVE, MODEL_FILENAME
from abstain.runtime import OnnxModel
from abstain.serving.triton_ensemble import write_ensemble
from tests.digits import load_digits
from tests.serving.servers import REPO, free_port, metric_value, pytriton_dir, start_triton, stop

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton"),
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (see .ci/run)"),
]

SELECTIVE_DIR = REPO / "models" / "digits-selective" / "1"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
SETTLE_S = 30


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, str]]:
    """(HTTP port, metrics port, ensemble name) of a Triton serving the monitored ensemble."""
    tmp = tmp_path_factory.mktemp("triton-ensemble")
    repo = tmp / "repository"
    ensemble = write_ensemble(SELECTIVE_DIR.parent, repo, python_backend=True)
    assert ensemble == "digits-selective-monitored"
    metrics_port = free_port()
    models = ["digits-selective", "digits-selective-metrics", ensemble]
    process, http, _grpc, _log = start_triton(repo, tmp, models, metrics_port=metrics_port)
    yield http, metrics_port, ensemble
    stop(process)


def _prometheus_query(url: str, promql: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(triton: tuple[int, int, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prometheus-triton")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "triton", "static_configs": [{"targets": [f"127.0.0.1:{triton[1]}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SETTLE_S
        # the first scrape must see the counters at zero, so rate() counts every decision sent
        while True:
            try:
                if _prometheus_query(url, 'abstain_decisions_total{model="digits"}'):
                    break
            except (httpx.HTTPError, ValueError):  # not listening yet, or 503 text while it starts
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


def _send(http: int, ensemble: str, x: np.ndarray) -> dict[str, np.ndarray]:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{http}")
    inp = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    result = client.infer(
        ensemble, [inp], outputs=[triton.InferRequestedOutput(n) for n in (ACCEPT_NAME, CLASS_INDEX_NAME)]
    )
    return {n: result.as_numpy(n) for n in (ACCEPT_NAME, CLASS_INDEX_NAME)}


def test_triton_metrics_and_the_recording_rule_show_the_decisions_sent(
    triton: tuple[int, int, str], prometheus: str
) -> None:
    http, metrics_port, ensemble = triton
    import json

    meta = json.loads(OnnxModel(SELECTIVE_DIR / MODEL_FILENAME, prefer_cuda=False).metadata[META_SELECTIVE])
    points = [p["name"] for p in meta["operating_points"]]
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    # as the service (serving/metrics.py): a risk point's gauge is its measured calibration coverage
    targets = {
        p["name"]: p["target_coverage"] if p["target_coverage"] is not None else p["coverage"]
        for p in meta["operating_points"]
    }
    for name, target in targets.items():  # the calibration's promise is on /metrics before any traffic
        assert metric_value(
            text, "abstain_target_coverage", model="digits", version="1", operating_point=name
        ) == pytest.approx(target)
    images = load_digits("test").x[:60]
    noise = np.random.default_rng(0).random((12, *images.shape[1:]), dtype=np.float32)
    accepts = [_send(http, ensemble, batch)[ACCEPT_NAME] for batch in (images[:30], images[30:], noise)]
    accept = np.concatenate(accepts)  # [72, P]
    assert accept.shape == (72, len(points))
    answered = {name: int(accept[:, j].sum()) for j, name in enumerate(points)}
    assert 0 < sum(answered.values()) < accept.size  # some answered, some abstained

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    for name, n_predict in answered.items():
        labels = {"model": "digits", "version": "1", "operating_point": name}
        assert metric_value(text, "abstain_decisions_total", decision="predict", **labels) == n_predict
        assert metric_value(text, "abstain_decisions_total", decision="abstain", **labels) == 72 - n_predict

    def rule_values() -> dict[str, float]:
        return {
            r["metric"]["operating_point"]: float(r["value"][1])
            for r in _prometheus_query(prometheus, 'abstain:abstention_rate:ratio_rate5m{model="digits"}')
        }

    want = {name: (72 - n) / 72 for name, n in answered.items()}
    deadline = time.monotonic() + SETTLE_S
    while (seen := rule_values()).keys() != want.keys() or any(abs(seen[k] - want[k]) > 1e-9 for k in want):
        assert time.monotonic() < deadline, f"recording rule gave {seen}, sent {want}"
        time.sleep(0.5)
    calibrated = {
        r["metric"]["operating_point"]: float(r["value"][1])
        for r in _prometheus_query(prometheus, 'abstain:abstention_rate:calibrated{model="digits"}')
    }
    assert calibrated == pytest.approx({name: 1 - target for name, target in targets.items()})
