"""Constants the deploy/ tests share: paths and the metric names the service exports."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

#: The metric families the service exports (serving/metrics.py), as named in the contract
#: the serving and deploy work share. Histograms also expose _bucket, _sum and _count.
COUNTERS = ("abstain_decisions_total", "abstain_rejected_inputs_total")
GAUGES = ("abstain_target_coverage", "abstain_abstention_rate", "abstain_estimated_risk")
# live selective risk from delayed labels (serving/store/live.py)
COUNTERS += ("abstain_feedback_total", "abstain_decisions_not_recorded_total")
GAUGES += (
    "abstain_live_selective_risk",
    "abstain_live_risk_lower_bound",
    "abstain_live_risk_upper_bound",
    "abstain_live_coverage",
    "abstain_live_labelled_decisions",
    "abstain_calibrated_risk",
)
HISTOGRAMS = ("abstain_selection_score", "abstain_inference_seconds", "abstain_batch_size")
#: Exported only when a graph with selection_logit has a logit-scale operating point.
OPTIONAL_HISTOGRAMS = ("abstain_selection_logit_score",)

#: Raw metric names (the `abstain_...` identifiers PromQL may use); recording rules are
#: `abstain:...` and are checked against rules.yml instead.
METRIC_NAME = re.compile(r"\babstain_[a-z_]+\b")
RECORDING_NAME = re.compile(r"\babstain:[a-z0-9_:]+\b")

#: Series of BentoML's own HTTP instruments the autoscalers read (bentoml/_internal/server/http/
#: instruments.py: a livesum gauge over the workers, `endpoint` = the request path, /metrics
#: not counted); tests/deploy/test_monitoring_end_to_end.py checks the real server exports them.
BENTOML_METRICS = ("bentoml_service_request_in_progress",)
#: Any raw metric name a PromQL query may read (abstain's or BentoML's).
ANY_METRIC_NAME = re.compile(r"\b(?:abstain|bentoml)_[a-z_]+\b")

SCALED_OBJECT = DEPLOY / "kubernetes" / "components" / "request-autoscaling" / "scaledobject.yaml"


def scaled_object_queries() -> dict[str, str]:
    """The PromQL of each Prometheus trigger of the KEDA ScaledObject, by trigger name."""
    import yaml

    scaled = yaml.safe_load(SCALED_OBJECT.read_text())
    return {
        t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"
    }
