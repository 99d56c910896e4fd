"""Every Kubernetes object deploy/ ships, checked against the Kubernetes OpenAPI schema
(strict: an unknown or misspelt field fails) that the ``kubernetes-validate`` package ships.

Core objects (Deployment, Service, ConfigMap, HorizontalPodAutoscaler) are validated whole,
as kustomize renders each overlay (``kubectl kustomize``) and as the files are. The custom
resources' own CRD schemas ship in no Python package (KServe's Python SDK has generated models,
not the CRD; KEDA has no Python package), so of those the parts that *are* Kubernetes types are
validated: the InferenceService components' containers (``io.k8s.api.core.v1.Container``) and
pod fields (``PodSpec``), the ScaledObject's HPA ``behavior``, the RayJob's pod templates. The
rest of each custom resource is checked for what it refers to in tests/deploy/test_kserve.py,
test_autoscaling.py and test_rayjob.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the Kubernetes JSON schemas) is not installed"
)
import jsonschema  # noqa: E402  (a dependency of kubernetes-validate)
from referencing import Registry, Resource  # noqa: E402

K8S = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
OVERLAYS = sorted(p.parent for p in K8S.rglob("kustomization.yaml") if "components" not in p.parts)
#: KServe's own fields of a predictor or transformer (V1beta1PredictorSpec / TransformerSpec of
#: KServe 0.21's generated models, less the PodSpec fields they inline); everything else in a
#: component must be a PodSpec field.
KSERVE_COMPONENT_FIELDS = {
    "minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
    "annotations", "deploymentStrategy", "storageUris", "workerSpec", "model",
}  # fmt: skip
#: KServe's fields of a predictor's `model` (V1beta1ModelSpec) beside the Container fields.
KSERVE_MODEL_FIELDS = {"modelFormat", "protocolVersion", "runtime", "runtimeVersion", "storageUri", "storage"}


def _version() -> str:
    return kubernetes_validate.latest_version()


@cache
def _validator(schema_file: str) -> jsonschema.protocols.Validator:
    """A strict validator of one type of the shipped schemas (``container-v1.json`` …), resolving
    its references as ``kubernetes_validate.validate`` does."""
    root = (
        Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{_version()}-local-strict"
    )
    schema = json.loads((root / schema_file).read_text())
    definitions = json.loads((root / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _check(schema_file: str, data: dict, where: str) -> None:
    errors = sorted(_validator(schema_file).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, f"{where}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def _validate_object(obj: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(obj, _version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {list(e.path)}: {e.message}")


def _patch_files() -> set[Path]:
    patches = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        patches |= {(kustomization.parent / p["path"]).resolve() for p in spec.get("patches", [])}
    return patches


CORE_FILES = sorted(
    p
    for p in K8S.rglob("*.yaml")
    if p.name != "kustomization.yaml" and p.resolve() not in _patch_files()
    and all(d["apiVersion"] != "keda.sh/v1alpha1" for d in yaml.safe_load_all(p.read_text()) if d)
)  # fmt: skip


def test_the_schemas_are_strict() -> None:
    """Not vacuous: a misspelt field and a port as a string fail."""
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, _version(), strict=True)
    service = yaml.safe_load_all((K8S / "base" / "service.yaml").read_text()).__next__()
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, _version(), strict=True)
    with pytest.raises(AssertionError):
        _check("container-v1.json", {"name": "x", "image": "x", "portz": []}, "typo")


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_each_manifest_file_is_a_valid_kubernetes_object(path: Path) -> None:
    for obj in yaml.safe_load_all(path.read_text()):
        if obj:
            _validate_object(obj, str(path.relative_to(DEPLOY)))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(K8S)))
def test_each_rendered_overlay_is_valid(overlay: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (it renders the kustomizations)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    objects = [d for d in yaml.safe_load_all(rendered) if d]
    assert objects
    for obj in objects:
        if obj["apiVersion"] == "keda.sh/v1alpha1":
            _check_scaled_object(obj, str(overlay.relative_to(DEPLOY)))
        else:
            _validate_object(obj, str(overlay.relative_to(DEPLOY)))


def _check_scaled_object(obj: dict, where: str) -> None:
    behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    _check("horizontalpodautoscalerbehavior-autoscaling-v2.json", behavior, f"{where}: ScaledObject behavior")


def test_the_scaled_object_hpa_behaviour_is_a_kubernetes_one() -> None:
    scaled = yaml.safe_load((K8S / "components" / "request-autoscaling" / "scaledobject.yaml").read_text())
    _check_scaled_object(scaled, "scaledobject.yaml")


def _kserve_components() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KSERVE.glob("*.yaml")):
        isvc = yaml.safe_load(path.read_text())
        for name in ("predictor", "transformer", "explainer"):
            if name in isvc["spec"]:
                found.append((f"{path.name}:{name}", isvc["spec"][name]))
    return found


@pytest.mark.parametrize("where,component", [pytest.param(w, c, id=w) for w, c in _kserve_components()])
def test_kserve_components_are_pod_specs_with_kubernetes_containers(where: str, component: dict) -> None:
    pod = {k: v for k, v in component.items() if k not in KSERVE_COMPONENT_FIELDS}
    unknown = (
        set(component) - KSERVE_COMPONENT_FIELDS - set(_validator("podspec-v1.json").schema["properties"])
    )
    assert not unknown, f"{where}: neither KServe's nor PodSpec fields: {sorted(unknown)}"
    if "containers" in pod:
        _check("podspec-v1.json", pod, where)  # containers, securityContext, … (strict)
    else:
        _check("podspec-v1.json", {**pod, "containers": [{"name": "x"}]}, where)
    if "model" in component:
        model = component["model"]
        container = {k: v for k, v in model.items() if k not in KSERVE_MODEL_FIELDS}
        _check("container-v1.json", {"name": "kserve-container", **container}, f"{where}.model")


def test_rayjob_pod_templates_are_kubernetes_pod_templates() -> None:
    job = yaml.safe_load((DEPLOY / "ray" / "rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        _check("podtemplatespec-v1.json", template, "rayjob.yaml")
