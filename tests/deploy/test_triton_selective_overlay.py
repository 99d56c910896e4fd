"""The Kubernetes Triton overlay serves the selective entry and its monitored ensemble."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = REPO / "deploy" / "kubernetes" / "triton" / "triton-deployment.yaml"


def test_init_container_writes_the_ensemble_of_the_shipped_selective_entry() -> None:
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]
    (init,) = pod["spec"]["initContainers"]
    command = " ".join(init["command"])
    # the entry the command names ships in models/ (hence in the image's /models)
    assert "abstain triton-ensemble /models/digits-selective" in command
    assert (REPO / "models" / "digits-selective" / "config.pbtxt").is_file()
    mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["model-repository"]
    assert f"--repository {mount}" in command
    # Prometheus finds Triton's /metrics (the ensemble's decision counters) like the service's
    annotations = pod["metadata"]["annotations"]
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "tritonserver")
    metrics_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "metrics")
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/scrape"] == "true"
