"""deploy/kserve: the InferenceServices run the serving image as deploy/kubernetes does (same
image, port, probes, settings the service reads), say they speak v2, and point at what exists:
the Triton predictor serves the abstain image's model repository with the overlay's Triton, the
transformer's `abstain serve` command line is one the CLI accepts and calls the predictor's
Service, its autoscaling query selects the transformer's pods.

KServe's CRD schema ships in no Python package (its SDK has generated models, not the CRD's
OpenAPI schema), so the InferenceService is checked for structure and cross-references here, and
its Kubernetes parts (containers, pod fields) against Kubernetes' schema in
test_manifest_schemas.py.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import typer
import yaml
from deploy_helpers import DEPLOY, REPO

from abstain.cli import app
from abstain.contract import CALIBRATION_FILENAME, DEFAULT_MODEL_NAME, latest_version_dir
from abstain.serving.config.options import BACKENDS, OPTIONS

KSERVE = DEPLOY / "kserve"
K8S = DEPLOY / "kubernetes"
#: Read by KServe's controller from a custom container (constants.CustomSpecProtocolEnvVarKey).
KSERVE_ENV = {"PROTOCOL"}
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _load(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


@pytest.fixture(scope="module")
def custom() -> dict:
    return _load("inferenceservice.yaml")


@pytest.fixture(scope="module")
def triton() -> dict:
    return _load("inferenceservice-triton.yaml")


def _base_container() -> dict:
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _base_hpa() -> dict:
    return yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())


def _abstain_containers() -> list[tuple[str, dict]]:
    return [
        ("inferenceservice.yaml", _load("inferenceservice.yaml")["spec"]["predictor"]),
        ("inferenceservice-triton.yaml", _load("inferenceservice-triton.yaml")["spec"]["transformer"]),
    ]


def _serve_params(container: dict) -> dict:
    """The parameters `abstain serve` parses from the transformer's `sh -c 'exec abstain serve …'`."""
    command = container["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 4, command  # script, then $0
    script = command[2]
    # KServe's appended arguments become $1…: the script must not pass them on
    assert "$@" not in script and not re.search(r"\$\{?[1-9*]", script)
    argv = shlex.split(script)
    assert argv[:3] == ["exec", "abstain", "serve"], argv
    group = typer.main.get_command(app)
    serve = group.get_command(
        group.make_context("abstain", ["serve", "--help"], resilient_parsing=True), "serve"
    )
    return serve.make_context("serve", argv[3:]).params  # raises on an unknown option or a bad value


def _listen_port(container: dict) -> int:
    if "command" in container:
        params = _serve_params(container)
        assert params["host"] == "0.0.0.0"
        return params["port"]
    # the image's entrypoint, `bentoml serve …`, takes the arguments
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    return int(args[args.index("--port") + 1])


def _calibration_points() -> list[str]:
    version = latest_version_dir(REPO / "models" / DEFAULT_MODEL_NAME)
    return [p["name"] for p in json.loads((version / CALIBRATION_FILENAME).read_text())["operating_points"]]


def test_both_are_v1beta1_inference_services_in_raw_deployment_mode(custom: dict, triton: dict) -> None:
    for isvc in (custom, triton):
        assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert custom["metadata"]["name"] != triton["metadata"]["name"]


@pytest.mark.parametrize("where,component", [pytest.param(w, c, id=w) for w, c in _abstain_containers()])
def test_abstain_runs_as_in_the_base_deployment(where: str, component: dict) -> None:
    (container,) = component["containers"]
    base = _base_container()
    assert container["name"] == "kserve-container"
    assert container["image"] == base["image"]  # deploy/Dockerfile's image, with /models
    # KServe routes one port per component; http1 is its name for HTTP/1.1 (h2c: gRPC)
    (port,) = container["ports"]
    assert port["name"] == "http1"
    assert _listen_port(container) == port["containerPort"]
    for probe in PROBES:
        assert container[probe]["httpGet"]["path"] == base[probe]["httpGet"]["path"], probe
        assert container[probe]["httpGet"]["port"] == port["containerPort"], probe
    annotations = component["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}


@pytest.mark.parametrize("where,component", [pytest.param(w, c, id=w) for w, c in _abstain_containers()])
def test_env_is_what_the_service_and_kserve_read(where: str, component: dict) -> None:
    (container,) = component["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    read = {o.env for o in OPTIONS} | {"ABSTAIN_MODEL_REPOSITORY"} | KSERVE_ENV
    assert set(env) <= read, f"read by neither: {sorted(set(env) - read)}"
    assert env["PROTOCOL"] == "v2"  # KServe's protocol of a custom container: /v2
    assert env["ABSTAIN_OPERATING_POINT"] in _calibration_points()
    if "ABSTAIN_BACKEND" in env:
        assert env["ABSTAIN_BACKEND"] in BACKENDS
    limit = float(container["resources"]["limits"]["cpu"])
    assert int(env.get("ABSTAIN_WORKERS", "1")) * int(env.get("ABSTAIN_ORT_THREADS", "1")) <= limit


def test_the_custom_predictor_embeds_onnxruntime_and_scales_on_cpu_as_base(custom: dict) -> None:
    predictor = custom["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert {e["name"]: e["value"] for e in container["env"]}["ABSTAIN_BACKEND"] == "onnxruntime"
    assert container["args"] == _base_container()["args"]
    hpa = _base_hpa()["spec"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    (cpu,) = hpa["metrics"]
    assert predictor["scaleMetric"] == cpu["resource"]["name"] == "cpu"
    assert predictor["scaleTarget"] == cpu["resource"]["target"]["averageUtilization"]
    assert "transformer" not in custom["spec"]


def test_the_triton_predictor_serves_the_abstain_image_repository_with_the_overlay_triton(
    triton: dict,
) -> None:
    model = triton["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    overlay = yaml.safe_load((K8S / "triton" / "triton-deployment.yaml").read_text())
    server = next(c for c in overlay["spec"]["template"]["spec"]["containers"] if c["name"] == "tritonserver")
    image, tag = server["image"].rsplit(":", 1)
    assert image == "nvcr.io/nvidia/tritonserver" and model["runtimeVersion"] == tag
    # modelcar: the abstain image's /models, i.e. this repository's models/ (deploy/Dockerfile)
    assert model["storageUri"] == f"oci://{_base_container()['image']}"
    assert "COPY models /models" in (DEPLOY / "Dockerfile").read_text()
    assert model["resources"]["limits"]["nvidia.com/gpu"] == server["resources"]["limits"]["nvidia.com/gpu"]


def test_the_transformer_serves_the_triton_predictor_selective_entry(triton: dict) -> None:
    (container,) = triton["spec"]["transformer"]["containers"]
    params = _serve_params(container)
    assert params["backend"] == "triton"
    host, port = params["triton_url"].split(":")
    assert host == f"{triton['metadata']['name']}-predictor"  # KServe's predictor Service
    assert int(port) == 80  # that Service's port, to Triton's HTTP
    # the local copy abstain verifies Triton against: the image's /models = models/
    model_dir = params["model_dir"]
    assert model_dir.parts[:2] == ("/", "models")
    assert (REPO / model_dir.relative_to("/")).is_dir()
    # the entry Triton decides with ships in models/ (Triton loads every entry of it)
    entry = REPO / "models" / params["triton_model"]
    assert (entry / "config.pbtxt").is_file() and (entry / "1" / "model.onnx").is_file()
    assert params["triton_model"] == "digits-selective"


def test_the_transformer_scales_on_its_own_in_flight_requests(triton: dict) -> None:
    transformer = triton["spec"]["transformer"]
    assert triton["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    (metric,) = transformer["autoScaling"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["backend"] == "prometheus"
    assert metric["external"]["target"]["type"] == "AverageValue"
    assert float(metric["external"]["target"]["averageValue"]) > 0
    query = metric["external"]["metric"]["query"]
    (pods,) = re.findall(r'pod=~"([^"]+)"', query)
    name = triton["metadata"]["name"]
    # KServe names the transformer's Deployment <name>-transformer; its pods add two suffixes
    assert re.fullmatch(pods, f"{name}-transformer-5d8f7c9b4-x7k2p")
    assert not re.fullmatch(pods, f"{name}-predictor-6b9c4d7f8-q2w3e")
    (namespace,) = re.findall(r'namespace="([^"]+)"', query)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "abstain")
    assert job["dns_sd_configs"][0]["names"][0].split(".")[1] == namespace  # one namespace to edit
    assert 1 <= transformer["minReplicas"] <= transformer["maxReplicas"]
