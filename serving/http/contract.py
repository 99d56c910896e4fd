"""What the request path needs from the running service: one typed contract.

The middlewares and routes of :mod:`abstain.serving.http` never reach for a global: each is
given a :data:`ServiceProvider`, a function returning the service of this worker (or ``None``
while BentoML is still building it). In the server that is :func:`current_service`
(BentoML's ``get_current_service``); in a test it can be ``lambda: service`` for any object
that satisfies :class:`ServiceContract`, so the request path runs in-process under
``httpx.ASGITransport``. :class:`abstain.serving.service.Abstain` satisfies it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

if TYPE_CHECKING:
    from abstain.contract import InputSpec
    from abstain.decisions import Decisions
    from abstain.serving.config.settings import ServeSettings
    from abstain.serving.http.answers import PredictResponse
    from abstain.serving.metrics import ServiceMetrics
    from abstain.serving.store.live import DecisionLog


@dataclass(frozen=True)
class DecidedBatch:
    """One decided batch as arrays, for the Open Inference Protocol's tensors (not JSON answers).

    ``outputs``: the backend's forward pass (``logits`` ``[N, K]``, ``selection`` ``[N]``,
    ``selection_logit`` ``[N]`` or ``None``); ``decisions``: the service's one decision path
    (:func:`abstain.decisions.decide_arrays`) at ``decisions.point``, counted in the metrics and
    recorded in the decision store under ``request_ids`` (one per image).
    """

    model: str
    version: str
    outputs: Any
    decisions: Decisions
    request_ids: list[str]


class ServiceContract(Protocol):
    """The service as its middlewares and routes see it."""

    settings: ServeSettings
    metrics: ServiceMetrics
    #: ``None`` when the decision store is off (``ABSTAIN_STORE=off``)
    decision_log: DecisionLog | None

    @property
    def served_model(self) -> tuple[str, str]:
        """``(name, version)`` of the model-repository entry served (cheap: per request)."""
        ...

    @property
    def class_names(self) -> Sequence[str]:
        """The class names, by class index (read-only here, so a ``list`` attribute satisfies it)."""
        ...

    @property
    def input_spec(self) -> InputSpec:
        """The graph's input: ``[C, H, W]`` of one image."""
        ...

    def max_body_bytes(self, npy: bool = False) -> int:
        """The largest ``/predict`` body a valid request needs, JSON or ``.npy``."""
        ...

    def metadata(self) -> dict[str, Any]:
        """The body of ``GET /metadata``."""
        ...

    async def predict_array(
        self, x: np.ndarray, operating_point: str | None = None, request_id: Any = None
    ) -> PredictResponse:
        """Decide a checked float32 batch ``[N, C, H, W]``; ``request_id`` as the client sent it.

        Raises the domain errors that :func:`abstain.serving.http.responses.error_response` maps."""
        ...

    async def decide_batch(
        self, x: np.ndarray, operating_point: str | None, request_ids: list[str] | None
    ) -> DecidedBatch:
        """Decide a checked float32 batch ``[N, C, H, W]`` as ``/predict`` does (metrics, decision
        store), returning the arrays; ``request_ids``: one per image, else made here."""
        ...

    @property
    def graph_outputs(self) -> tuple[str, ...]:
        """The graph outputs a forward pass returns: ``logits``, ``selection`` and, when the graph
        has it, ``selection_logit``."""
        ...

    def __is_ready__(self) -> bool:
        """Whether the service answers requests (BentoML's ``/readyz``)."""
        ...

    async def predict_npy(
        self, body: bytes, operating_point: str | None, request_ids: list[str] | None = None
    ) -> PredictResponse:
        """Decide a ``.npy`` body (checked here); ``request_ids``: one per image, if any."""
        ...


#: Returns this worker's service, or ``None`` while it is being built.
ServiceProvider = Callable[[], "ServiceContract | None"]


def current_service() -> ServiceContract | None:
    """This worker's service, from BentoML (the only place the request path asks BentoML for it).

    Asked per request, never at import or during the lifespan start-up, when it would wait for
    the service being built."""
    import bentoml

    return cast("ServiceContract | None", bentoml.get_current_service())
