"""Inference backends: the graph's forward pass, embedded here (ONNX Runtime) or remote
(:mod:`abstain.serving.triton.backend`).

Every backend takes a validated float32 batch ``[N, C, H, W]`` and returns
:class:`abstain.runtime.GraphOutputs` (``logits [N, K]``, ``selection [N]``); everything
after that (scores, thresholds, decisions) is shared, so a backend cannot change what a
threshold means.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from abstain.runtime import GraphOutputs, OnnxModel


class BackendUnavailableError(RuntimeError):
    """The forward pass failed in the backend (down, past its timeout, errored): the request was
    valid, retry later. Answered 503 with :attr:`reason`."""

    reason = "backend_unavailable"

    def __init__(self, backend: str, cause: BaseException | str) -> None:
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"the {backend} inference backend failed ({detail[:300]})")
        self.backend, self.detail = backend, detail


class ServedGraphMismatchError(BackendUnavailableError):
    """The backend answers with another graph than the calibrated one: no answer is given with
    thresholds calibrated for another graph. Answered 503 with :attr:`reason`."""

    reason = "graph_mismatch"


class Backend(Protocol):
    """What the service needs from a backend."""

    name: str

    def infer(self, x: np.ndarray) -> GraphOutputs:
        """Forward pass of a validated float32 batch ``[N, C, H, W]``."""
        ...


class OnnxRuntimeBackend:
    """The graph in this process: ONNX Runtime, CUDA provider when present, else CPU."""

    name = "onnxruntime"

    def __init__(self, model: OnnxModel) -> None:
        self.model = model

    def infer(self, x: np.ndarray) -> GraphOutputs:
        return self.model.run(x)
