"""Request-based autoscaling: the KEDA ScaledObject of deploy/kubernetes/components/
request-autoscaling (and the KServe transformer's KEDA metric) reads series the service really
exports, from the Prometheus job that scrapes the abstain pods, and its queries compute what
they claim: promtool evaluates each on hand-made series, Triton's job, probes and other pods
included (and a query with its filter dropped fails the same check). The component replaces
base's CPU HPA (never two HPAs on one Deployment) and keeps base's bounds.

KEDA's CRD schema ships in no Python package, so the ScaledObject is checked here for what it
refers to (and its HPA behaviour against Kubernetes' schema in test_manifest_schemas.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    ANY_METRIC_NAME,
    BENTOML_METRICS,
    DEPLOY,
    SCALED_OBJECT,
    scaled_object_queries,
)

K8S = DEPLOY / "kubernetes"
COMPONENT = SCALED_OBJECT.parent
KSERVE_TRITON = DEPLOY / "kserve" / "inferenceservice-triton.yaml"


def _scaled() -> dict:
    return yaml.safe_load(SCALED_OBJECT.read_text())


def _base_hpa() -> dict:
    return yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())


def _kserve_transformer_query() -> str:
    isvc = yaml.safe_load(KSERVE_TRITON.read_text())
    (metric,) = isvc["spec"]["transformer"]["autoScaling"]["metrics"]
    return metric["external"]["metric"]["query"]


def test_the_scaled_object_scales_the_abstain_deployment_within_base_bounds() -> None:
    scaled, hpa = _scaled(), _base_hpa()
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref == hpa["spec"]["scaleTargetRef"]  # the Deployment base's CPU HPA scaled
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert scaled["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
    assert scaled["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]


def test_the_component_deletes_base_cpu_hpa() -> None:
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    (patch,) = component["patches"]
    deleted = yaml.safe_load((COMPONENT / patch["path"]).read_text())
    hpa = _base_hpa()
    assert deleted["$patch"] == "delete"
    assert (deleted["apiVersion"], deleted["kind"], deleted["metadata"]["name"]) == (
        hpa["apiVersion"],
        hpa["kind"],
        hpa["metadata"]["name"],
    )
    assert "scaledobject.yaml" in component["resources"]
    overlay = yaml.safe_load((K8S / "triton-autoscaled" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../triton"]
    assert (K8S / "triton-autoscaled" / overlay["components"][0]).resolve() == COMPONENT.resolve()


def _kustomize(kubectl: str, directory: Path) -> list[dict]:
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_rendered_overlays_have_exactly_one_autoscaler_for_abstain() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (it renders the kustomizations)")
    autoscaled = _kustomize(kubectl, K8S / "triton-autoscaled")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in autoscaled}
    assert ("ScaledObject", "abstain") in kinds and ("Deployment", "abstain") in kinds
    assert not any(kind == "HorizontalPodAutoscaler" for kind, _ in kinds)
    config = next(o for o in autoscaled if o["kind"] == "ConfigMap")["data"]
    assert config["ABSTAIN_BACKEND"] == "triton"  # the backend where CPU is the wrong signal
    # base keeps its CPU HPA: the embedded backend's inference is in the pod
    base = _kustomize(kubectl, K8S / "base")
    (hpa,) = [o for o in base if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert not any(o["kind"] == "ScaledObject" for o in base)


def test_triggers_read_series_the_service_exports_from_the_abstain_job(
    exported_metrics: frozenset[str],
) -> None:
    triggers = _scaled()["spec"]["triggers"]
    assert {t["name"] for t in triggers} == {"requests-in-flight", "decisions-per-second"}
    jobs = {
        j["job_name"]
        for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    }
    for trigger in triggers:
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"  # per-pod targets: ceil(total / threshold)
        meta = trigger["metadata"]
        assert re.fullmatch(r"https?://[^/\s]+(:\d+)?/?", meta["serverAddress"])
        assert float(meta["threshold"]) > 0
        assert meta["ignoreNullValues"] == "true"
        used = set(ANY_METRIC_NAME.findall(meta["query"]))
        assert used and used <= exported_metrics | set(BENTOML_METRICS), used
        (job,) = re.findall(r'job="([^"]+)"', meta["query"])
        assert job in jobs and job == "abstain"
    queries = scaled_object_queries()
    assert "abstain_decisions_total" in queries["decisions-per-second"]
    assert "bentoml_service_request_in_progress" in queries["requests-in-flight"]
    used = set(ANY_METRIC_NAME.findall(_kserve_transformer_query()))
    assert used and used <= exported_metrics | set(BENTOML_METRICS)


def _promtool(promtool: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _unit_tests(in_flight: str, decisions: str, kserve: str) -> dict:
    """Hand-made series (15 s apart for 5 min) and what each query must return at 4 min."""
    gauge, counter = "bentoml_service_request_in_progress", "abstain_decisions_total"
    pod1, pod2 = 'job="abstain",instance="10.0.0.1:3000"', 'job="abstain",instance="10.0.0.2:3000"'
    digits = 'model="digits",version="1"'
    kserve_pod = 'namespace="default",pod="abstain-triton-transformer-6f7d9-x2x"'
    series = [
        # the inference endpoints of two abstain pods: 3 + 2 + 1 + 1 = 7 in flight
        (f'{gauge}{{{pod1},endpoint="/predict"}}', "3x20"),
        (f'{gauge}{{{pod1},endpoint="/v2/models/digits/infer"}}', "2x20"),
        (f'{gauge}{{{pod2},endpoint="/v2/models/digits/versions/1/infer"}}', "1x20"),
        (f'{gauge}{{{pod2},endpoint="/predict_image"}}', "1x20"),
        # not inference: probes, the protocol's health and metadata; another job
        (f'{gauge}{{{pod1},endpoint="/readyz"}}', "5x20"),
        (f'{gauge}{{{pod2},endpoint="/v2/health/ready"}}', "5x20"),
        (f'{gauge}{{{pod2},endpoint="/v2/models/digits"}}', "5x20"),
        (f'{gauge}{{job="other",instance="10.0.0.9:3000",endpoint="/predict"}}', "50x20"),
        # decisions: 1/s and 2/s on the two pods; Triton's monitored ensemble counts its own
        (f'{counter}{{{pod1},{digits},operating_point="coverage-0.9",decision="predict"}}', "0+12x20"),
        (f'{counter}{{{pod1},{digits},operating_point="coverage-0.9",decision="abstain"}}', "0+3x20"),
        (f'{counter}{{{pod2},{digits},operating_point="risk-0.05",decision="predict"}}', "0+30x20"),
        (f'{counter}{{job="triton",instance="10.0.1.1:8002",{digits},decision="predict"}}', "0+150x20"),
        # KServe transformer pods (kubernetes-pods discovery labels): 4 in flight
        (f'{gauge}{{{kserve_pod},endpoint="/v2/models/digits/infer"}}', "4x20"),
        (f'{gauge}{{{kserve_pod},endpoint="/livez"}}', "9x20"),
        (f'{gauge}{{namespace="default",pod="abstain-6c5b8-kq2",endpoint="/predict"}}', "9x20"),
        (
            f'{gauge}{{namespace="staging",pod="abstain-triton-transformer-55c-8zz",endpoint="/predict"}}',
            "9x20",
        ),
    ]
    expect = [(in_flight, 7), (decisions, 3), (kserve, 4)]
    return {
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "4m", "exp_samples": [{"labels": "{}", "value": value}]}
                    for expr, value in expect
                ],
            }
        ],
    }


def _run_unit_tests(promtool: str, tmp_path: Path, in_flight: str, decisions: str, kserve: str):
    (tmp_path / "autoscaling_test.yml").write_text(yaml.safe_dump(_unit_tests(in_flight, decisions, kserve)))
    return _promtool(promtool, tmp_path, "test", "rules", "autoscaling_test.yml")


def test_promtool_evaluates_the_autoscaling_queries_on_hand_made_series(
    promtool: str, tmp_path: Path
) -> None:
    queries = scaled_object_queries()
    result = _run_unit_tests(
        promtool,
        tmp_path,
        queries["requests-in-flight"],
        queries["decisions-per-second"],
        _kserve_transformer_query(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    "which,broken",
    [
        ("requests-in-flight", lambda q: re.sub(r",\s*endpoint=~\"[^\"]+\"", "", q)),  # probes counted
        ("decisions-per-second", lambda q: q.replace('{job="abstain"}', "")),  # Triton's counted
        ("kserve", lambda q: q.replace('namespace="default",', "")),  # another namespace's
    ],
)
def test_the_unit_tests_catch_a_query_that_lost_its_filter(
    promtool: str, tmp_path: Path, which: str, broken
) -> None:
    queries = {**scaled_object_queries(), "kserve": _kserve_transformer_query()}
    mutated = broken(queries[which])
    assert mutated != queries[which]
    queries[which] = mutated
    result = _run_unit_tests(
        promtool, tmp_path, queries["requests-in-flight"], queries["decisions-per-second"], queries["kserve"]
    )
    assert result.returncode != 0, f"a broken {which} query passed"


def test_promtool_checks_the_queries_as_rules(promtool: str, tmp_path: Path) -> None:
    queries = {**scaled_object_queries(), "kserve-transformer": _kserve_transformer_query()}
    rules = {
        "groups": [
            {
                "name": "autoscaling",
                "rules": [
                    {"record": f"abstain:autoscaling_{n.replace('-', '_')}", "expr": q}
                    for n, q in queries.items()
                ],
            }
        ]
    }
    (tmp_path / "autoscaling.yml").write_text(yaml.safe_dump(rules))
    result = _promtool(promtool, tmp_path, "check", "rules", "autoscaling.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout + result.stderr
