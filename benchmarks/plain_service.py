"""The framework floor for benchmarks/serve_peers.py: a plain BentoML service that only runs the graph.

No validation, calibration, decisions or metrics: JSON pixels in, the graph's two outputs out,
with BentoML's defaults (its request timeout, tracing and access log included) — what an
operator gets from a BentoML example service. ``PLAIN_GRAPH`` names the ``model.onnx``.

    PLAIN_GRAPH=models/digits/1/model.onnx bentoml serve benchmarks.plain_service:Plain
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(name="plain", workers=1, traffic={"timeout": 30})
class Plain:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("PLAIN_THREADS", "0"))
        self.session = ort.InferenceSession(
            os.environ["PLAIN_GRAPH"], options, providers=["CPUExecutionProvider"]
        )

    @bentoml.api(route="/predict")
    def predict(self, pixels: list[Any]) -> dict[str, Any]:
        x = np.asarray(pixels, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        logits, selection = self.session.run(["logits", "selection"], {"pixels": x})
        return {"logits": logits.tolist(), "selection": selection.tolist()}
