"""Triton Python-backend model that runs the exported ``model.onnx`` with ONNX Runtime (CPU).

Stands in for Triton's ``onnxruntime_onnx`` backend where that backend is not available (the
``nvidia-pytriton`` wheel ships only the Python backend): same graph file, same input and
output names, so the remote backend sees exactly the numbers the embedded one does.

Layout in a Triton model repository::

    <repo>/<name>/config.pbtxt        backend: "python", same inputs/outputs as the ONNX config
    <repo>/<name>/<version>/model.py   this file
    <repo>/<name>/<version>/model.onnx the exported graph

Imports only numpy and onnxruntime (and Triton's ``triton_python_backend_utils``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

INPUT_NAME, LOGITS_NAME, SELECTION_NAME = "pixels", "logits", "selection"  # abstain.contract


class TritonPythonModel:
    """Triton's Python-backend entry point: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        # 1 by default: tests share 2 cores with the service and pytest; the config's parameter
        # intra_op_threads overrides it (benchmarks/serve_peers.py tunes it)
        threads = self.config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "1")
        options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        # every output the config declares, in its order: logits and selection for an exported
        # graph, plus class_index, confidence, scores and accept for a selective graph
        # (`abstain export-selective`); dtypes are the graph's, which the config states
        self.outputs = [o["name"] for o in self.config["output"]] or [LOGITS_NAME, SELECTION_NAME]
        # outputs declared dims [1] with reshape [ ]: the model side must be [N] (an older
        # graph's selection may be [N, 1])
        self.flat = {
            o["name"] for o in self.config["output"] if "reshape" in o and not o["reshape"].get("shape")
        }

    def execute(self, requests: list) -> list:
        # Triton's dynamic batcher may hand several requests at once: run them as one batch
        xs = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        sizes = [len(x) for x in xs]
        values = self.session.run(self.outputs, {INPUT_NAME: np.concatenate(xs).astype(np.float32)})
        responses, start = [], 0
        for n in sizes:
            stop = start + n
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(
                            name, np.ascontiguousarray(v.reshape(-1) if name in self.flat else v)[start:stop]
                        )
                        for name, v in zip(self.outputs, values, strict=True)
                    ]
                )
            )
            start = stop
        return responses

    def finalize(self) -> None:
        self.session = None
