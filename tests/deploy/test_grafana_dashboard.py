"""deploy/grafana/abstain-dashboard.json: valid JSON, every query reads metrics the service
exports or recording rules rules.yml defines, and it has the panels the runbook refers to."""

from __future__ import annotations

import json

import pytest
import yaml
from deploy_helpers import DEPLOY, METRIC_NAME, RECORDING_NAME


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "abstain-dashboard.json").read_text())


def _exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def test_queries_read_only_exported_metrics(dashboard: dict, exported_metrics: frozenset[str]) -> None:
    used = {name for expr in _exprs(dashboard) for name in METRIC_NAME.findall(expr)}
    assert used <= exported_metrics, f"not exported by the service: {sorted(used - exported_metrics)}"
    # every exported family is shown somewhere
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    exported = {n for n in exported_metrics if not n.endswith(("_bucket", "_sum", "_count"))}
    assert families == exported


def test_queries_use_only_defined_recording_rules(dashboard: dict) -> None:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    used = {name for expr in _exprs(dashboard) for name in RECORDING_NAME.findall(expr)}
    assert used and used <= recorded, sorted(used - recorded)


def test_has_the_panels_operators_need(dashboard: dict) -> None:
    by_title = {p["title"]: p for p in dashboard["panels"]}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    abstention = exprs["Abstention rate vs what calibration promised"]
    assert "abstain:abstention_rate:ratio_rate5m" in abstention
    assert "abstain:abstention_rate:calibrated" in abstention  # 1 - target coverage
    assert "by (decision)" in exprs["Decisions per second by decision"]
    assert by_title["Selection score distribution (heatmap)"]["type"] == "heatmap"
    assert "histogram_quantile(0.99" in exprs["Inference latency p50 / p99"]
    assert "histogram_quantile(0.5," in exprs["Inference latency p50 / p99"]
    assert "abstain_batch_size" in exprs["Batch size"]
    assert "by (reason)" in exprs["Rejected inputs by reason"]


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24  # Grafana's grid is 24 columns wide
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"panel {p['title']!r} overlaps another"
        cells |= area


def test_every_query_uses_the_datasource_variable(dashboard: dict) -> None:
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "version", "operating_point"} <= names
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_has_the_live_risk_panels(dashboard: dict) -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    live = exprs["Live selective risk, its label-free estimate, and what calibration vouches for"]
    for name in (
        "abstain_live_selective_risk",
        "abstain_live_risk_lower_bound",
        "abstain_estimated_risk",
        "abstain_calibrated_risk",
    ):
        assert name in live  # both alerts' two sides, on one panel
    assert "by (result)" in exprs["Labels posted and decisions not recorded"]
