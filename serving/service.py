"""The BentoML predict-or-abstain service: ``bentoml serve abstain.serving.service:Abstain``.

Endpoints: ``POST /predict`` (JSON pixels, one image or a batch), ``POST /predict_image``
(PNG/JPEG upload), ``GET /metadata``, the Open Inference Protocol under ``/v2`` (and over gRPC
with ``ABSTAIN_GRPC_PORT``: ``serving/http/v2_routes.py``, ``grpc_service.py``); BentoML adds
``/livez``, ``/readyz`` (ready only after the graph is loaded and, for Triton, verified) and
``/metrics`` (ours included, merged over workers). Configuration comes from ``ABSTAIN_*``
environment variables (:mod:`abstain.serving.config.settings`), which ``abstain serve`` sets.

Start-up refusal: importing this module checks the graph, its calibration (present, valid,
same sha256) and the operating point; a failure raises before BentoML starts any worker, so
``bentoml serve`` exits non-zero with the message. Never imports torch.

Every answer is a prediction or an abstention decided by the calibrated threshold of the
exact graph served (SelectiveNet, Geifman & El-Yaniv ICML 2019; SYNC loss, arXiv 2602.11316).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from abstain.contract import LOGITS_NAME, SELECTION_LOGIT_NAME, SELECTION_NAME, InputSpec
from abstain.decisions import Decisions, decide_arrays
from abstain.operating_points import OperatingPoint
from abstain.serving.config.settings import ServeSettings
from abstain.serving.http import client_errors
from abstain.serving.http.answers import Answer, PredictResponse, answers
from abstain.serving.http.contract import DecidedBatch, current_service
from abstain.serving.http.middleware import (
    CheckUploadForms,
    CountFrameworkRejections,
    JsonPredict,
    LimitPredictBody,
    NpyPredict,
    install_request_timeout,
)
from abstain.serving.http.open_inference import EXTENSIONS as OPEN_INFERENCE_EXTENSIONS
from abstain.serving.http.request_ids import new_request_ids, parse_request_ids
from abstain.serving.http.responses import error_response
from abstain.serving.http.routes import routes
from abstain.serving.http.v2_routes import V2Infer
from abstain.serving.http.validation import (
    InputRejectedError,
    batch_length,
    decode_image,
    parse_npy,
    parse_pixels,
)
from abstain.serving.inference.artifacts import load_artifacts, load_graph
from abstain.serving.inference.backends import (
    Backend,
    BackendUnavailableError,
    OnnxRuntimeBackend,
    ServedGraphMismatchError,
)
from abstain.serving.inference.batcher import AdaptiveBatcher
from abstain.serving.metrics import ServiceMetrics
from abstain.serving.store.live import DecisionLog
from abstain.serving.triton.backend import GraphMismatchError, TritonBackend
from abstain.serving.triton.monitor import GRAPH_MISMATCH, TritonMonitor
from abstain.serving.triton.selective_backend import TritonSelectiveBackend
from abstain.serving.triton.startup import selective_entry, verify_remote_backend

SETTINGS = ServeSettings.from_env()
ARTIFACTS = load_artifacts(SETTINGS.model_dir, SETTINGS.operating_point)  # refuse to start here
#: Triton serves a selective entry (`abstain export-selective`) and decides (triton/selective_backend.py)
TRITON_SELECTIVE_ENTRY = selective_entry(SETTINGS, ARTIFACTS)
# here too, so that `bentoml serve` exits with the message instead of restarting workers
if (_warning := verify_remote_backend(SETTINGS, ARTIFACTS)) is not None:
    logging.getLogger("bentoml.abstain").warning("%s", _warning)

# BentoML's request timeout keeps every finished request alive for the whole timeout (growing
# GC stalls); ours cancels its timer. Before BentoML builds the worker's app: see the docstring.
install_request_timeout()
# BentoML logs a client's bad request to its own endpoints (a body its schema refuses) as an
# ERROR with a traceback; an operator reads that as an outage (see the module)
client_errors.install()

#: BentoML's server logging shows INFO lines of the ``bentoml`` logger tree only (ours would
#: need WARNING to appear): the start-up line that names the execution provider goes there.
startup_log = logging.getLogger("bentoml.abstain")

#: Requests with at least this many pixels are converted on a thread, and requests of at least
#: OFFLOAD_IMAGES images decided on one, not on the event loop: a 256-image request must not
#: hold up a concurrent one-image request or /livez for the milliseconds its conversion takes.
#: Smaller ones stay on the loop, where a thread hop would cost more than the work.
OFFLOAD_PIXELS = 64 * 1024
OFFLOAD_IMAGES = 64
T = TypeVar("T")


async def off_loop(big: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the loop's default thread pool when ``big``, else right here."""
    if not big:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


metadata_app = Starlette(routes=routes(current_service))


@bentoml.asgi_app(metadata_app, path="/")
@bentoml.service(
    name="abstain",
    workers=SETTINGS.workers,
    # overload: beyond max_concurrency in-flight requests BentoML answers 429; past timeout, 504
    traffic={"max_concurrency": SETTINGS.max_concurrency, "timeout": SETTINGS.timeout},
    # per-request work the service does not need, off by configuration: an access-log line
    # (Prometheus counts requests) and an OpenTelemetry span for the hot endpoints (no exporter
    # is configured, yet the span, its lists and locks were built and dropped per request)
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/predict", "/predict_image", "/livez", "/readyz", "/metrics", "/v2"]},
)
class Abstain:
    """Predict or abstain with the calibrated SelectiveNet graph (see the module docstring)."""

    def __init__(self) -> None:
        self.settings, self.artifacts = SETTINGS, ARTIFACTS
        # read once, hashed and loaded from the same bytes; refused unless still the calibrated graph;
        # ONNX Runtime threads share the cores between workers instead of oversubscribing them
        self.model = load_graph(ARTIFACTS, intra_op_threads=SETTINGS.intra_op_threads())
        self.class_names = ARTIFACTS.labels or self.model.class_names
        self.pixels = math.prod(self.model.input_spec.shape)  # C·H·W of one image
        if len(self.class_names) != self.model.num_classes:
            raise ValueError(
                f"{ARTIFACTS.entry_dir}/labels.txt has {len(self.class_names)} names but the graph "
                f"has {self.model.num_classes} classes; fix labels.txt"
            )
        backend: Backend
        if TRITON_SELECTIVE_ENTRY is not None:
            backend = TritonSelectiveBackend(
                SETTINGS.triton_url,
                TRITON_SELECTIVE_ENTRY,
                ARTIFACTS.version,
                timeout_s=SETTINGS.triton_timeout,
            )
        elif SETTINGS.backend == "triton":
            backend = TritonBackend(
                SETTINGS.triton_url, ARTIFACTS.name, ARTIFACTS.version, timeout_s=SETTINGS.triton_timeout
            )
        else:
            backend = OnnxRuntimeBackend(self.model)
        self.backend = backend
        self.metrics = ServiceMetrics(
            ARTIFACTS.name,
            ARTIFACTS.version,
            backend.name,
            ARTIFACTS.calibration,
            window=SETTINGS.rolling_window,
        )
        self.batcher = AdaptiveBatcher(
            backend.infer,
            SETTINGS.batch_max_size,
            SETTINGS.batch_max_latency_ms,
            on_batch=self.metrics.observe_batch,
            name=backend.name,
            # a remote pass mostly waits on the network: keep several in flight
            max_in_flight=SETTINGS.triton_concurrency if isinstance(backend, TritonBackend) else 1,
        )
        # decisions recorded off the event loop, labels joined by POST /feedback (None: ABSTAIN_STORE=off)
        self.decision_log = DecisionLog.from_settings(
            SETTINGS, ARTIFACTS.name, ARTIFACTS.version, ARTIFACTS.calibration
        )
        self.monitor: TritonMonitor | None = None
        if isinstance(backend, TritonBackend):
            self.monitor = TritonMonitor(backend, self.model, interval_s=SETTINGS.triton_probe_interval)
            if self.monitor.probe() == GRAPH_MISMATCH:  # swapped since the import-time check
                raise GraphMismatchError(self.monitor.detail)
            self.monitor.start()  # unreachable now: up, not ready, probing until it verifies
        startup_log.info(
            "serving %s/%s (graph %s) with %s on %s",
            ARTIFACTS.name,
            ARTIFACTS.version,
            ARTIFACTS.graph_sha256[:12],
            backend.name,
            self.execution_provider or f"Triton at {SETTINGS.triton_url}",
        )
        self._ready = True
        # the graph, sessions and imported modules live as long as the worker: move them out of
        # the generations the collector walks, so a full collection looks at request garbage only
        gc.collect()
        gc.freeze()

    @property
    def execution_provider(self) -> str | None:
        """The ONNX Runtime execution provider that runs the graph here (``CUDAExecutionProvider``
        or ``CPUExecutionProvider``), as the session reports it after loading — not merely what
        was asked for; ``None`` when Triton runs the graph."""
        if self.settings.backend == "triton":
            return None
        return self.model.providers[0]

    def max_body_bytes(self, npy: bool = False) -> int:
        """Largest ``/predict`` body accepted, JSON or ``.npy`` (see :class:`LimitPredictBody`)."""
        pixels = math.prod(self.model.input_spec.shape)
        if npy:  # float32: 4 bytes a pixel, plus the header
            need = self.settings.max_batch * pixels * 4 + LimitPredictBody.SLACK_BYTES
            return min(need, self.settings.max_request_bytes)
        need = self.settings.json_batch * pixels * LimitPredictBody.BYTES_PER_NUMBER
        need += LimitPredictBody.SLACK_BYTES
        # JSON: half the byte limit, since parsed JSON costs ~23 bytes of memory per body byte
        # (docs/benchmarks.md, "Measurements behind design choices")
        return min(need, self.settings.max_request_bytes // 2)

    @bentoml.on_startup
    async def _start_grpc(self) -> None:
        """``ABSTAIN_GRPC_PORT``: this worker's Open Inference Protocol gRPC server, on its event
        loop (the workers share the port: ``serving/http/grpc_service.py``)."""
        self._grpc_server: Any = None
        if self.settings.grpc_port:
            from abstain.serving.http import grpc_service

            settings = self.settings
            self._grpc_server = await grpc_service.start(self, settings.grpc_port, settings.grpc_host)

    @bentoml.on_shutdown
    async def _stop_grpc(self) -> None:
        if getattr(self, "_grpc_server", None) is not None:
            await self._grpc_server.stop(grace=1.0)

    def __is_ready__(self) -> bool:
        # not ready while Triton is unreachable or serves another graph (TritonMonitor)
        monitor = getattr(self, "monitor", None)
        return getattr(self, "_ready", False) and (monitor is None or monitor.ready)

    def metadata(self) -> dict[str, Any]:
        """Model, version, classes, input spec, backend and operating points (``GET /metadata``)."""
        cal = self.artifacts.calibration
        return {
            "model": self.artifacts.name,
            "version": self.artifacts.version,
            "graph_sha256": self.artifacts.graph_sha256,
            "backend": self.backend.name,
            "execution_provider": self.execution_provider,
            "classes": list(self.class_names),
            "input_spec": self.model.input_spec.to_dict(),
            "max_batch": self.settings.max_batch,
            "max_json_batch": self.settings.json_batch,
            "max_request_bytes": self.settings.max_request_bytes,
            "default_operating_point": self.settings.operating_point or cal.default_operating_point,
            # the Open Inference Protocol (KServe / Triton v2): REST under /v2 (serving/http/v2_routes.py)
            "open_inference": {
                "rest": "/v2",
                "grpc_port": self.settings.grpc_port or None,
                "extensions": list(OPEN_INFERENCE_EXTENSIONS),
            },
            "operating_points": [
                {
                    "name": p.name,
                    "method": p.method,
                    "score": p.score,
                    "threshold": p.threshold,
                    "target_coverage": p.target_coverage,
                    "target_risk": p.target_risk,
                    "delta": p.delta,
                    "coverage": p.coverage,
                    "risk": p.risk,
                }
                for p in cal.operating_points
            ],
        }

    @property
    def input_spec(self) -> InputSpec:
        return self.model.input_spec

    @property
    def served_model(self) -> tuple[str, str]:
        return self.artifacts.name, self.artifacts.version

    def _operating_point(self, name: str | None) -> OperatingPoint:
        calibration = self.artifacts.calibration
        try:
            return calibration.operating_point(name or self.settings.operating_point)
        except KeyError:
            raise InputRejectedError(
                "unknown_operating_point",
                f"unknown operating point {name!r}; valid: {', '.join(calibration.names)}",
            ) from None

    async def _forward(self, x: np.ndarray) -> Any:
        """The backend's outputs for ``x``; :class:`BackendUnavailableError` when it failed."""
        monitor = self.monitor
        if monitor is None:
            return await self.batcher.submit(x)
        if not monitor.ready:  # known down or wrong: answer now, not at the timeout
            if monitor.state == GRAPH_MISMATCH:
                raise ServedGraphMismatchError(self.backend.name, monitor.detail)
            raise BackendUnavailableError(self.backend.name, monitor.detail)
        try:
            # queued behind hung calls, a request still ends by the Triton timeout plus a little
            return await asyncio.wait_for(self.batcher.submit(x), self.settings.triton_timeout + 0.5)
        except asyncio.TimeoutError as exc:
            limit = self.settings.triton_timeout + 0.5
            failure = BackendUnavailableError(self.backend.name, f"no answer within {limit:g} s")
            monitor.report_failure(failure)
            raise failure from exc
        except BackendUnavailableError as exc:
            monitor.report_failure(exc)
            raise

    async def _decided(
        self, x: np.ndarray, operating_point: str | None, request_ids: list[str] | None, with_answers: bool
    ) -> tuple[OperatingPoint, Any, list[str], list[Answer], Decisions]:
        """The one path of every endpoint: decide ``x`` (float32 ``[N, C, H, W]``, checked) at the
        named operating point, count it, record it; ``(point, outputs, ids, answers, decisions)``,
        the JSON answers built only ``with_answers`` (``/predict``; the ``/v2`` tensors need none)."""
        point = self._operating_point(operating_point)
        out = await self._forward(x)
        ids = request_ids if request_ids is not None else new_request_ids(len(x))
        big = len(x) >= OFFLOAD_IMAGES
        predictions, decisions = await off_loop(big, self._answers, out, point, ids, with_answers)
        if self.decision_log is not None:
            self.decision_log.record(ids, decisions, x)
        return point, out, ids, predictions, decisions

    async def _decide(
        self, x: np.ndarray, operating_point: str | None, request_ids: list[str] | None = None
    ) -> PredictResponse:
        """Decide ``x`` (float32 ``[N, C, H, W]``, checked) at the named operating point."""
        point, _, _, predictions, _ = await self._decided(x, operating_point, request_ids, with_answers=True)
        return {
            "model": self.artifacts.name,
            "version": self.artifacts.version,
            "operating_point": point.name,
            "predictions": predictions,
        }

    async def decide_batch(
        self, x: np.ndarray, operating_point: str | None, request_ids: list[str] | None
    ) -> DecidedBatch:
        """Decide ``x`` as :meth:`_decide` does, but return the arrays, for the Open Inference
        Protocol's tensors (``serving/http/open_inference.py``)."""
        _, out, ids, _, decisions = await self._decided(x, operating_point, request_ids, with_answers=False)
        return DecidedBatch(self.artifacts.name, self.artifacts.version, out, decisions, ids)

    @property
    def graph_outputs(self) -> tuple[str, ...]:
        """``logits``, ``selection`` and, when the calibrated graph has it, ``selection_logit``."""
        names = (LOGITS_NAME, SELECTION_NAME)
        return (*names, SELECTION_LOGIT_NAME) if self.model.has_selection_logit else names

    def _answers(
        self, out: Any, point: OperatingPoint, request_ids: list[str], with_answers: bool = True
    ) -> tuple[list[Answer], Decisions]:
        """The answers to a forward pass's outputs (none unless ``with_answers``), counted in the
        metrics, and their decisions."""
        # a selective entry (Triton decides) returns, per point in calibration order, the decision
        # it took and the score it compared, which the answer reports on the threshold's scale
        column = self.artifacts.calibration.names.index(point.name)
        accept, scores = getattr(out, "accept", None), getattr(out, "scores", None)
        decisions = decide_arrays(
            out.logits,
            out.selection,
            point,
            getattr(out, "selection_logit", None),  # a selection point's threshold is then a logit
            score_value=None if scores is None else scores[:, column],
            answered=None if accept is None else accept[:, column],
            temperature=self.artifacts.calibration.temperature,  # the label-free risk estimate's
        )
        confidence = decisions.calibrated_confidence
        self.metrics.observe_decisions(
            point.name,
            decisions.answered.tolist(),
            point.score,
            decisions.score_value.tolist(),
            None if confidence is None else confidence.tolist(),
            # per-class counts for a class-conditional point only (ServiceMetrics.per_class_points)
            decisions.class_index.tolist() if point.name in self.metrics.per_class_points else None,
        )
        return (answers(decisions, self.class_names, request_ids) if with_answers else []), decisions

    async def predict_npy(
        self, body: bytes, operating_point: str | None, request_ids: list[str] | None = None
    ) -> PredictResponse:
        """``POST /predict`` with a ``.npy`` body (:class:`abstain.serving.http.middleware.NpyPredict`);
        ``request_ids``: the ``request_id`` query parameters, one per image, if any."""
        big = len(body) >= 4 * OFFLOAD_PIXELS
        x = await off_loop(big, parse_npy, body, self.model.input_spec, self.settings.max_batch)
        return await self._decide(x, operating_point, parse_request_ids(request_ids or None, len(x)))

    async def predict_pixels(
        self, pixels: list[Any], operating_point: str | None = None, request_id: Any = None
    ) -> PredictResponse:
        """``POST /predict`` with JSON pixels as Python lists (the BentoML endpoint below)."""
        big = (batch_length(pixels) or 1) * self.pixels >= OFFLOAD_PIXELS
        x = await off_loop(big, parse_pixels, pixels, self.model.input_spec, self.settings.json_batch)
        return await self.predict_array(x, operating_point, request_id)

    async def predict_array(
        self, x: np.ndarray, operating_point: str | None = None, request_id: Any = None
    ) -> PredictResponse:
        """``POST /predict`` for pixels already checked and converted (float32 ``[N, C, H, W]``),
        by :class:`abstain.serving.http.middleware.JsonPredict` or :meth:`predict_pixels`."""
        return await self._decide(x, operating_point, parse_request_ids(request_id, len(x)))

    async def _respond(self, work: Awaitable[PredictResponse]) -> PredictResponse | JSONResponse:
        """The answer of ``work``, or the error answer of what it raised (one mapping:
        :func:`abstain.serving.http.responses.error_response`)."""
        try:
            return await work
        except Exception as exc:
            return error_response(exc, self.metrics)

    @bentoml.api(route="/predict")
    async def predict(
        self, pixels: list[Any], operating_point: str | None = None, request_id: str | list[str] | None = None
    ) -> dict[str, Any]:
        """Predict or abstain for one image ``[C, H, W]`` or a batch ``[N, C, H, W]`` (pixels in [0, 1]).

        ``request_id``: the client's own id per image (else one is made); answers carry it. JSON
        bodies are answered by :class:`abstain.serving.http.middleware.JsonPredict` and ``.npy``
        bodies (``Content-Type: application/x-npy``) by :class:`abstain.serving.http.middleware.NpyPredict`,
        both before BentoML parses anything; this endpoint documents the schema."""
        # BentoML passes a Response through as it is; its schema names the answer's dict
        return await self._respond(self.predict_pixels(pixels, operating_point, request_id))  # type: ignore[return-value]

    @bentoml.api(route="/predict_image")
    async def predict_image(
        self, image: Path, operating_point: str | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        """Predict or abstain for one PNG or JPEG upload, converted to the graph's input spec."""

        async def decide() -> PredictResponse:
            x = decode_image(Path(image).read_bytes(), self.model.input_spec)
            return await self._decide(x, operating_point, parse_request_ids(request_id, len(x)))

        return await self._respond(decide())  # type: ignore[return-value]


# the decorators made the class a bentoml Service, which mypy does not see through bentoml's
# lazily exported names; outermost first, each given this worker's service by current_service
SERVICE = cast(Any, Abstain)
SERVICE.add_asgi_middleware(CountFrameworkRejections)
SERVICE.add_asgi_middleware(CheckUploadForms)
SERVICE.add_asgi_middleware(LimitPredictBody)
SERVICE.add_asgi_middleware(NpyPredict)  # inside the limit: its body is bounded already
SERVICE.add_asgi_middleware(JsonPredict)
SERVICE.add_asgi_middleware(V2Infer)  # POST /v2/…/infer, before BentoML's routing
