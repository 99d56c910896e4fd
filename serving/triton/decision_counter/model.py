"""Triton Python-backend step that counts a selective graph's decisions on Triton's ``/metrics``.

The last step of the ensemble written by ``serving/triton/ensemble.py``: it receives ``accept``
bool ``[N, P]`` from the selective graph (``abstain export-selective``), passes it through, and
counts each image's decision per operating point with Triton's custom metrics API
(``pb_utils.MetricFamily``), under the service's metric names and labels
(``serving/metrics.py``)::

    abstain_decisions_total{model, version, operating_point, decision="predict"|"abstain"}
    abstain_target_coverage{model, version, operating_point}

so deploy/prometheus/rules.yml, its alerts and the Grafana dashboard read both paths alike.
Configured by the step's ``parameters`` (model, version, operating_points as JSON).
Imports only numpy and Triton's ``triton_python_backend_utils``.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

ACCEPT_NAME = "accept"  # abstain.contract.ACCEPT_NAME


class TritonPythonModel:
    """Triton's Python-backend entry point: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        model, version = params["model"], params["version"]
        points = json.loads(params["operating_points"])  # [{"name", "target_coverage"}], column order
        decisions = pb_utils.MetricFamily(
            name="abstain_decisions_total",
            description="Predict-or-abstain decisions.",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        coverage = pb_utils.MetricFamily(
            name="abstain_target_coverage",
            description="Coverage the operating point was calibrated for (target, else measured).",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        # one child per (point, decision), created up front so a series exists at 0 from the
        # first scrape (the rules' rate() needs two samples), as the service does
        self.counters = []
        for p in points:
            labels = {"model": model, "version": version, "operating_point": p["name"]}
            self.counters.append(
                (
                    decisions.Metric(labels={**labels, "decision": "predict"}),
                    decisions.Metric(labels={**labels, "decision": "abstain"}),
                )
            )
            if p.get("target_coverage") is not None:
                coverage.Metric(labels=labels).set(float(p["target_coverage"]))
        self.families = (decisions, coverage)  # keep them alive as long as the model

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            accept = pb_utils.get_input_tensor_by_name(request, ACCEPT_NAME).as_numpy()  # [N, P] bool
            answered = accept.sum(axis=0)  # [P]
            for (predict, abstain), n in zip(self.counters, answered.tolist(), strict=True):
                if n:
                    predict.increment(n)
                if len(accept) - n:
                    abstain.increment(len(accept) - n)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(ACCEPT_NAME, accept)])
            )
        return responses

    def finalize(self) -> None:
        self.counters = []
