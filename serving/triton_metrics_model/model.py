"""Triton Python-backend step that counts a selective graph's decisions on Triton's ``/metrics``.

The second step of the ensemble written by ``abstain triton-ensemble``
(:mod:`abstain.serving.triton_ensemble`): input ``accept`` bool ``[N, P]`` from the selective
graph, output the same tensor unchanged. It exports, through Triton's custom metrics API
(``pb_utils.MetricFamily``, Python backend >= 23.05), the *same* metric names and labels as the
service (``serving/metrics.py``), so ``deploy/prometheus/rules.yml`` and the dashboard work for
both paths:

* ``abstain_decisions_total{model, version, operating_point, decision}`` counter
* ``abstain_target_coverage{model, version, operating_point}`` gauge (calibration's promise)

Families are registered once in ``initialize`` and every child is created there (a counter at
zero before the first request, so ``rate()`` counts the very first decisions). The model name,
version and operating points come from the config's ``parameters`` (written from the selective
graph's metadata). Imports only numpy and Triton's ``triton_python_backend_utils``.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

ACCEPT_NAME = "accept"  # abstain.contract.ACCEPT_NAME
PREDICT, ABSTAIN = "predict", "abstain"  # abstain.serving.decisions


class TritonPythonModel:
    """Triton's Python-backend entry point: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        model, version = params["model"], params["version"]
        points = json.loads(params["operating_points"])  # [{"name": ..., "target_coverage": ...}]
        self.decisions = pb_utils.MetricFamily(
            name="abstain_decisions_total",
            description="Predict-or-abstain decisions, by operating point",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.target = pb_utils.MetricFamily(
            name="abstain_target_coverage",
            description="Coverage the operating point was calibrated for",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        # column j of accept is points[j]: one (predict, abstain) pair of counters per column
        self.counters, self.gauges = [], []  # held: a Metric unregisters when collected
        for point in points:
            labels = {"model": model, "version": version, "operating_point": point["name"]}
            self.counters.append(
                tuple(self.decisions.Metric(labels={**labels, "decision": d}) for d in (PREDICT, ABSTAIN))
            )
            if point.get("target_coverage") is not None:
                gauge = self.target.Metric(labels=labels)
                gauge.set(float(point["target_coverage"]))
                self.gauges.append(gauge)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            accept = pb_utils.get_input_tensor_by_name(request, ACCEPT_NAME).as_numpy()  # [n, P] bool
            answered = accept.sum(axis=0)
            for (predict, abstain), n_predict in zip(self.counters, answered, strict=True):
                predict.increment(float(n_predict))
                abstain.increment(float(len(accept) - n_predict))
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(ACCEPT_NAME, np.ascontiguousarray(accept))]
                )
            )
        return responses

    def finalize(self) -> None:
        self.counters, self.gauges = [], []
