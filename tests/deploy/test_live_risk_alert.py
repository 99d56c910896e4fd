"""End to end: labels posted to a real 2-worker service make a real Prometheus fire
``AbstainLiveRiskAboveCalibrated`` on a crafted stream (every answer labelled wrong) and not
on a clean one (true labels).

The service runs as the ConfigMap configures it (its SQLite decision store in a temporary
BENTOML_HOME); Prometheus scrapes it every second and evaluates the real rules.yml, with
only this alert's ``for`` shortened from 15 minutes to 3 seconds so the test ends in
seconds (rules_test.yml checks the 15 minutes).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml
from deploy_helpers import DEPLOY, REPO
from test_monitoring_end_to_end import (
    PROMETHEUS,
    SETTLE_TIMEOUT_S,
    START_TIMEOUT_S,
    _configmap_env,
    _free_port,
    _query,
    _start,
    _stop,
    _wait_for,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

ALERT = "AbstainLiveRiskAboveCalibrated"
CRAFTED, CLEAN = "coverage-0.95", "coverage-0.8"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("abstain-live")
    port = _free_port()
    env = {**os.environ, **_configmap_env(), "ABSTAIN_MODEL_REPOSITORY": str(REPO / "models"),
           "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}  # fmt: skip
    env.pop("ABSTAIN_MODEL_DIR", None)
    log = tmp / "bentoml.log"
    argv = [sys.executable, "-m", "bentoml", "serve", "abstain.serving.service:Abstain",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = _start(argv, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
                  START_TIMEOUT_S, "bentoml serve ready", process, log)  # fmt: skip
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install Debian's `prometheus` package (see .ci/run)")
    tmp = tmp_path_factory.mktemp("prometheus-live")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    (alert,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert alert["for"] == "15m"
    alert["for"] = "3s"
    (tmp / "rules.yml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [
            {"job_name": "abstain", "static_configs": [{"targets": [service.removeprefix("http://")]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = tmp / "prometheus.log"
    argv = [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    process = _start(argv, dict(os.environ), log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=5).status_code == 200,
                  30, "prometheus ready", process, log)  # fmt: skip
        yield url
    finally:
        _stop(process)


def _send_and_label(client: httpx.Client, point: str, wrong: bool) -> tuple[int, int]:
    """40 digits at ``point``; label them (answered ones wrongly if ``wrong``). Returns (answered, errors)."""
    from tests.digits import load_digits

    test = load_digits("test")
    ids = [f"{point}-{i}" for i in range(40)]
    body = {"pixels": test.x[:40].tolist(), "operating_point": point, "request_id": ids}
    preds = client.post("/predict", json=body).json()["predictions"]
    labels, answered, errors = [], 0, 0
    for p, y in zip(preds, test.y[:40], strict=True):
        top = p["class_index"] if p["decision"] == "predict" else p["candidate"]["class_index"]
        label = (top + 1) % 10 if wrong and p["decision"] == "predict" else int(y)
        labels.append({"request_id": p["request_id"], "label": label})
        answered += p["decision"] == "predict"
        errors += p["decision"] == "predict" and label != top
    deadline = time.monotonic() + 10
    while (reply := client.post("/feedback", json=labels)).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.1)  # the answering worker writes its decisions within 0.1 s
    assert reply.status_code == 200, reply.text
    return answered, errors


def test_live_risk_alert_fires_on_a_crafted_stream_and_not_on_a_clean_one(
    service: str, prometheus: str
) -> None:
    with httpx.Client(base_url=service, timeout=30) as client:
        crafted = _send_and_label(client, CRAFTED, wrong=True)
        clean = _send_and_label(client, CLEAN, wrong=False)
    assert crafted[1] == crafted[0] > 20  # every answer wrong
    assert clean[1] <= 1  # the embedded model is right on (nearly) all of what it answers at 0.8

    def firing() -> list[dict]:
        return _query(prometheus, f'ALERTS{{alertname="{ALERT}",alertstate="firing"}}')

    deadline = time.monotonic() + SETTLE_TIMEOUT_S  # scrape, refresh, rule evaluation, `for: 3s`
    while not (fired := firing()):
        assert time.monotonic() < deadline, _query(prometheus, "abstain:live_risk_lower_bound")
        time.sleep(0.5)
    assert {r["metric"]["operating_point"] for r in fired} == {CRAFTED}
    # the clean stream was evaluated too (its bound is there, under the calibrated risk), and
    # never even became pending
    lower = _query(prometheus, f'abstain:live_risk_lower_bound{{operating_point="{CLEAN}"}}')
    calibrated = _query(prometheus, f'abstain:calibrated_risk{{operating_point="{CLEAN}"}}')
    assert lower and calibrated and float(lower[0]["value"][1]) <= float(calibrated[0]["value"][1])
    assert not _query(prometheus, f'ALERTS{{alertname="{ALERT}",operating_point="{CLEAN}"}}')
