"""deploy/kubernetes: the manifests parse, and everything that refers to something else
points at something that exists (labels and selectors, ports, probe paths, ConfigMap
keys, the Prometheus discovery name, the Triton overlay's URL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO

from abstain.contract import CALIBRATION_FILENAME, DEFAULT_MODEL_NAME, latest_version_dir
from abstain.serving.config.options import BACKENDS, OPTIONS

K8S = DEPLOY / "kubernetes"


def _kustomize(directory: Path) -> list[dict]:
    """The objects of a kustomization: its resources (recursively), then its patches merged
    into the object of the same kind and name (data/labels maps only: all our patches need)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        if path.is_dir():
            objects += _kustomize(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        target = _find(objects, doc["kind"], doc["metadata"]["name"])
        for key in ("data",):
            target.setdefault(key, {}).update(doc.get(key, {}))
    return objects


def _find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return _kustomize(K8S / "base")


@pytest.fixture(scope="module")
def triton() -> list[dict]:
    return _kustomize(K8S / "triton")


def _container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _port_names(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_every_manifest_file_is_part_of_a_kustomization() -> None:
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        listed |= {(kustomization.parent / r).resolve() for r in spec["resources"]}
        listed |= {(kustomization.parent / p["path"]).resolve() for p in spec.get("patches", [])}
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - listed == set(), "manifests no kustomization applies"


def test_base_holds_the_expected_objects(base: list[dict]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base)
    assert kinds == [
        ("ConfigMap", "abstain-config"),
        ("Deployment", "abstain"),
        ("HorizontalPodAutoscaler", "abstain"),
        ("Service", "abstain"),
        ("Service", "abstain-pods"),
    ]


def test_deployment_selector_matches_its_pod_labels(base: list[dict]) -> None:
    deployment = _find(base, "Deployment", "abstain")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("service_name", ["abstain", "abstain-pods"])
def test_services_select_the_pods_and_target_a_named_port(base: list[dict], service_name: str) -> None:
    deployment = _find(base, "Deployment", "abstain")
    service = _find(base, "Service", service_name)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = _port_names(_container(deployment, "abstain"))
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports


def test_probes_use_the_service_health_endpoints_on_the_http_port(base: list[dict]) -> None:
    container = _container(_find(base, "Deployment", "abstain"), "abstain")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in _port_names(container)


def test_service_binds_the_port_the_container_declares(base: list[dict]) -> None:
    container = _container(_find(base, "Deployment", "abstain"), "abstain")
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert int(args[args.index("--port") + 1]) == _port_names(container)["http"]


def test_prometheus_annotations_point_at_metrics_on_the_container_port(base: list[dict]) -> None:
    deployment = _find(base, "Deployment", "abstain")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == _port_names(_container(deployment, "abstain"))["http"]


def test_prometheus_discovers_each_pod_through_the_headless_service(base: list[dict]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "abstain")
    (sd,) = job["dns_sd_configs"]
    headless = _find(base, "Service", sd["names"][0].split(".")[0])
    assert headless["spec"]["clusterIP"] == "None"  # one A record per pod, not a virtual IP
    container = _container(_find(base, "Deployment", "abstain"), "abstain")
    assert sd["port"] == _port_names(container)["http"]


def test_hpa_scales_the_deployment_which_requests_cpu(base: list[dict]) -> None:
    hpa = _find(base, "HorizontalPodAutoscaler", "abstain")
    deployment = _find(base, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # CPU utilisation is relative to the request: without one the HPA cannot compute it
    resources = _container(deployment, "abstain")["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_configmap_is_what_the_service_reads(base: list[dict]) -> None:
    deployment = _find(base, "Deployment", "abstain")
    container = _container(deployment, "abstain")
    config = _find(base, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    # every key is a variable the service reads (a typo would be silently ignored)
    read = {o.env for o in OPTIONS} | {"ABSTAIN_MODEL_REPOSITORY"}  # the latter: abstain.contract
    assert set(config) <= read, f"not read by the service: {sorted(set(config) - read)}"
    assert config["ABSTAIN_BACKEND"] in BACKENDS
    # the operating point exists in the calibration of the model the image ships
    version = latest_version_dir(REPO / "models" / DEFAULT_MODEL_NAME)
    calibration = json.loads((version / CALIBRATION_FILENAME).read_text())
    names = [p["name"] for p in calibration["operating_points"]]
    assert config["ABSTAIN_OPERATING_POINT"] in names
    # workers x ONNX Runtime threads fit the CPU limit
    limit = _cpu(container["resources"]["limits"]["cpu"])
    assert int(config["ABSTAIN_WORKERS"]) * int(config["ABSTAIN_ORT_THREADS"]) <= limit


def test_triton_overlay_points_abstain_at_the_triton_service(triton: list[dict]) -> None:
    config = _find(triton, "ConfigMap", "abstain-config")["data"]
    assert config["ABSTAIN_BACKEND"] == "triton"
    host, port = config["ABSTAIN_TRITON_URL"].split(":")
    service = _find(triton, "Service", host)
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert http["port"] == int(port)
    deployment = _find(triton, "Deployment", "triton")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    server = _container(deployment, "tritonserver")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= _port_names(server).keys()
    assert _port_names(server)["http"] == http["port"]


def test_triton_serves_the_model_repository_of_the_abstain_image(triton: list[dict]) -> None:
    deployment = _find(triton, "Deployment", "triton")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    abstain = _container(_find(triton, "Deployment", "abstain"), "abstain")
    assert init["image"] == abstain["image"]  # same image, same graphs and calibrations
    server = _container(deployment, "tritonserver")
    assert server["image"].startswith("nvcr.io/nvidia/tritonserver:")
    repository = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("--model-repository="))
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts["model-repository"] == repository
    assert init_mounts["model-repository"] in " ".join(init["command"])
    assert "model-repository" in {v["name"] for v in pod["volumes"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"].startswith("/v2/health/")
        assert server[probe]["httpGet"]["port"] in _port_names(server)


def test_triton_selective_overlay_points_abstain_at_a_shipped_selective_entry() -> None:
    objects = _kustomize(K8S / "triton-selective")
    config = _find(objects, "ConfigMap", "abstain-config")["data"]
    assert config["ABSTAIN_BACKEND"] == "triton"
    entry = K8S.parents[1] / "models" / config["ABSTAIN_TRITON_MODEL"]
    # Triton loads every entry of the image's models/, so the selective one must ship there
    assert (entry / "config.pbtxt").is_file() and (entry / "1" / "model.onnx").is_file()
    _find(objects, "Deployment", "triton")


def test_prometheus_scrapes_triton_metrics_port_of_the_triton_overlay(triton: list[dict]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "triton")
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    (name,) = sd["names"]
    service = _find(triton, "Service", name.split(".")[0])
    abstain_job = next(j for j in config["scrape_configs"] if j["job_name"] == "abstain")
    same_namespace = abstain_job["dns_sd_configs"][0]["names"][0].split(".")[1:]
    assert name.split(".")[1:] == same_namespace
    metrics = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert sd["port"] == metrics["port"] == 8002
    server = _container(_find(triton, "Deployment", "triton"), "tritonserver")
    assert _port_names(server)[metrics["targetPort"]] == 8002  # Triton's --metrics-port default
    # one replica behind a ClusterIP: its one A record is that pod (see prometheus.yml)
    assert _find(triton, "Deployment", "triton")["spec"]["replicas"] == 1
