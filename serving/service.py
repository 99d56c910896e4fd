"""The BentoML predict-or-abstain service: ``bentoml serve serving.service:Abstain``.

Endpoints: ``POST /predict`` (JSON pixels, one image or a batch), ``POST /predict_image``
(PNG/JPEG upload), ``GET /metadata``; BentoML adds ``/livez``, ``/readyz`` (ready only after
the graph is loaded and, for Triton, verified) and ``/metrics`` (ours included, merged over
workers). Configuration comes from ``ABSTAIN_*`` environment variables
(:mod:`serving.settings`), which ``abstain serve`` sets.

Start-up refusal: importing this module checks the graph, its calibration (present, valid,
same sha256) and the operating point; a failure raises before BentoML starts any worker, so
``bentoml serve`` exits non-zero with the message. Never imports torch.

Every answer is a prediction or an abstention decided by the calibrated threshold of the
exact graph served (SelectiveNet, Geifman & El-Yaniv ICML 2019; SYNC loss, arXiv 2602.11316).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import bentoml
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.backends import Backend, OnnxRuntimeBackend, TritonBackend, verify_triton_serves
from serving.batcher import AdaptiveBatcher
from serving.decisions import decide
from serving.metrics import ServiceMetrics
from serving.settings import ServeSettings, load_artifacts, load_graph
from serving.validation import MAX_IMAGE_BYTES, InputRejectedError, decode_image, parse_pixels

SETTINGS = ServeSettings.from_env()
ARTIFACTS = load_artifacts(SETTINGS.model_dir, SETTINGS.operating_point)  # refuse to start here
if SETTINGS.backend == "triton":
    # here too, so that `bentoml serve` exits with the message instead of restarting workers
    verify_triton_serves(
        SETTINGS.triton_url,
        ARTIFACTS.graph_path,
        ARTIFACTS.name,
        ARTIFACTS.version,
        graph_sha256=ARTIFACTS.graph_sha256,
        timeout_s=SETTINGS.triton_timeout,
    )

log = logging.getLogger(__name__)

#: Header on the service's own 4xx answers, so the middleware does not count them twice.
REJECTED_HEADER = "x-abstain-rejected"
STATUS = {"batch_too_large": 413}  # every other rejection is a 400


def rejection(exc: InputRejectedError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.message, "reason": exc.reason},
        status_code=STATUS.get(exc.reason, 400),
        headers={REJECTED_HEADER: exc.reason},
    )


def backend_unavailable(backend: str, exc: Exception) -> JSONResponse:
    """503 for a failed forward pass: the input was fine, the backend was not (retry later)."""
    detail = f"{type(exc).__name__}: {exc}"
    return JSONResponse(
        {
            "error": f"the {backend} inference backend failed ({detail[:300]}); the request was valid, "
            "retry later",
            "reason": "backend_unavailable",
        },
        status_code=503,
    )


class CountFrameworkRejections:
    """ASGI middleware: count 4xx answers that BentoML gives before our code runs.

    Malformed JSON and bodies that do not match the endpoint's schema are answered 400 by
    BentoML's request parsing; they are still rejected inputs, so they reach
    ``abstain_rejected_inputs_total`` here (``bad_json`` for ``/predict``, ``bad_image`` for
    ``/predict_image``). Answers carrying :data:`REJECTED_HEADER` were counted already.
    """

    REASONS: ClassVar[dict[str, str]] = {"/predict": "bad_json", "/predict_image": "bad_image"}

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = self.REASONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if reason is None:
            return await self.app(scope, receive, send)

        async def counting_send(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and 400 <= message["status"] < 500
                and message["status"] not in (429,)
            ):
                names = {k.lower() for k, _ in message.get("headers", [])}
                service = bentoml.get_current_service()
                if REJECTED_HEADER.encode() not in names and service is not None:
                    service.metrics.reject(reason)
            await send(message)

        await self.app(scope, receive, counting_send)


def replay_receive(body: bytes, receive: Receive) -> Receive:
    """An ASGI ``receive`` that hands over ``body`` (already read) as the whole request once,
    then defers to the real ``receive`` (for the disconnect message)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class LimitJsonBody:
    """ASGI middleware: answer 413 ``batch_too_large`` to a ``/predict`` body no valid request needs.

    BentoML 1.4 has no request-size limit, and ``ABSTAIN_MAX_BATCH`` is only checked after the
    whole body is parsed into Python lists (tens of bytes per number): a huge body could take
    a worker's memory first. The limit is what the largest valid batch can take as compact
    JSON, :data:`BYTES_PER_NUMBER` per pixel (``0.12345678901234568, `` is 21, an exponent
    form 24) times ``max_batch · C · H · W``, plus :data:`SLACK_BYTES` for brackets and the
    operating point (see :meth:`Abstain.max_body_bytes`). A ``Content-Length`` over it is
    refused before reading; a body without one is read up to the limit and refused once it
    passes it; at most the limit is ever buffered. The rest of a refused body is read and
    dropped (up to :data:`DRAIN_BYTES`, no memory kept) so that the client, still sending,
    sees the 413 instead of a reset connection.
    """

    PATH = "/predict"
    BYTES_PER_NUMBER = 25
    SLACK_BYTES = 64 * 1024
    DRAIN_BYTES = 64 * 1024 * 1024

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.PATH or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        # only now: asked during the lifespan start-up, it would wait for the service being built
        service = bentoml.get_current_service()
        if service is None:
            return await self.app(scope, receive, send)
        limit = service.max_body_bytes
        length = Headers(scope=scope).get("content-length")
        too_large = length is not None and length.isdigit() and int(length) > limit
        body = bytearray()
        seen, more = 0, True
        while more and not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            more = message.get("more_body", False)
            if seen > limit:
                too_large = True
            else:
                body += chunk
        if too_large:
            body.clear()
            while more and seen <= self.DRAIN_BYTES:  # let the client finish sending, keep nothing
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
            exc = InputRejectedError(
                "batch_too_large",
                f"the request body is larger than {limit} bytes, the most that "
                f"{service.settings.max_batch} images of {list(service.model.input_spec.shape)} take as "
                f"JSON; valid: at most {service.settings.max_batch} images per request, as compact JSON",
            )
            service.metrics.reject(exc.reason)
            return await rejection(exc)(scope, receive, send)

        await self.app(scope, replay_receive(bytes(body), receive), send)


class CheckUploadForms:
    """ASGI middleware: answer 400, not 500, to a ``/predict_image`` form BentoML cannot use.

    BentoML 1.4 parses a form body inside a catch-all that turns starlette's 400 for malformed
    ``multipart/form-data`` (no boundary, broken framing) into a 500, and it takes a *text*
    ``image`` field for a URL to download (a 500 here, and no upload service should fetch
    URLs its clients name). So the body of a form ``POST /predict_image`` is read here and
    parsed once with the same starlette parser: a malformed body, a text ``image`` or a file
    in another field is rejected as ``bad_image``; anything else is replayed to BentoML as it
    came. Found by the schema-based fuzz run (``tests/serving/test_fuzz.py``).
    """

    PATH = "/predict_image"
    #: the largest form buffered here: the image limit plus room for the form's framing
    MAX_FORM_BYTES = MAX_IMAGE_BYTES + 1024 * 1024
    #: the media types BentoML hands to its form parser (``_bentoml_impl.serde.ALL_SERDE``)
    FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
    VALID = (
        "valid: multipart/form-data with a PNG or JPEG file upload in field 'image' and, "
        "optionally, a text field 'operating_point'"
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.PATH or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        # split as BentoML does to choose its parser (case-sensitive, like its lookup)
        media_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip()
        if media_type not in self.FORM_TYPES:
            return await self.app(scope, receive, send)
        body = bytearray()
        problem: str | None = None
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.MAX_FORM_BYTES:  # never buffer an unbounded body in memory
                problem = f"the form body is larger than {self.MAX_FORM_BYTES // (1024 * 1024)} MB"
                break
            if not message.get("more_body", False):
                break
        if problem is None:
            problem = await self._problem(scope, bytes(body), media_type)
        if problem is not None:
            exc = InputRejectedError("bad_image", f"{problem}; {self.VALID}")
            service = bentoml.get_current_service()
            if service is not None:
                service.metrics.reject(exc.reason)
            return await rejection(exc)(scope, receive, send)

        await self.app(scope, replay_receive(bytes(body), receive), send)

    @staticmethod
    async def _problem(scope: Scope, body: bytes, media_type: str) -> str | None:
        async def receive_body() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, receive_body).form()
        except HTTPException as exc:  # starlette's answer to a malformed body
            return f"the request is not a valid {media_type} body ({exc.detail})"
        try:
            for key, value in form.multi_items():
                if key == "image" and not isinstance(value, UploadFile):
                    return "field 'image' should be a file upload, but got a text field"
                if key != "image" and isinstance(value, UploadFile):
                    return f"field {key!r} should be a text field, but got a file upload"
            return None
        finally:
            await form.close()


async def _metadata(_: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    if service is None:
        return JSONResponse({"error": "service is starting"}, status_code=503)
    return JSONResponse(service.metadata())


metadata_app = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"])])


@bentoml.asgi_app(metadata_app, path="/")
@bentoml.service(
    name="abstain",
    workers=SETTINGS.workers,
    # overload: beyond max_concurrency in-flight requests BentoML answers 429; past timeout, 504
    traffic={"max_concurrency": SETTINGS.max_concurrency, "timeout": SETTINGS.timeout},
)
class Abstain:
    """Predict or abstain with the calibrated SelectiveNet graph (see the module docstring)."""

    def __init__(self) -> None:
        self.settings, self.artifacts = SETTINGS, ARTIFACTS
        # ONNX Runtime threads: share the cores between workers instead of oversubscribing them
        threads = int(
            os.environ.get("ABSTAIN_ORT_THREADS") or max(1, (os.cpu_count() or 1) // SETTINGS.workers)
        )
        # read once, hashed and loaded from the same bytes; refused unless still the calibrated graph
        self.model = load_graph(ARTIFACTS, intra_op_threads=threads)
        self.class_names = ARTIFACTS.labels or self.model.class_names
        if len(self.class_names) != self.model.num_classes:
            raise ValueError(
                f"{ARTIFACTS.entry_dir}/labels.txt has {len(self.class_names)} names but the graph "
                f"has {self.model.num_classes} classes; fix labels.txt"
            )
        backend: Backend
        if SETTINGS.backend == "triton":
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
        )
        if isinstance(backend, TritonBackend):
            # on the inference thread: the HTTP client is per-thread (see serving.backends)
            self.batcher._executor.submit(backend.verify, self.model).result()
        self._ready = True

    @property
    def max_body_bytes(self) -> int:
        """Largest ``/predict`` body accepted (see :class:`LimitJsonBody`)."""
        numbers = self.settings.max_batch * math.prod(self.model.input_spec.shape)
        return numbers * LimitJsonBody.BYTES_PER_NUMBER + LimitJsonBody.SLACK_BYTES

    def __is_ready__(self) -> bool:
        return getattr(self, "_ready", False)

    def metadata(self) -> dict[str, Any]:
        """Model, version, classes, input spec, backend and operating points (``GET /metadata``)."""
        cal = self.artifacts.calibration
        return {
            "model": self.artifacts.name,
            "version": self.artifacts.version,
            "graph_sha256": self.artifacts.graph_sha256,
            "backend": self.backend.name,
            "classes": list(self.class_names),
            "input_spec": self.model.input_spec.to_dict(),
            "max_batch": self.settings.max_batch,
            "default_operating_point": self.settings.operating_point or cal.default_operating_point,
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

    async def _decide(self, x: Any, operating_point: str | None) -> dict[str, Any] | JSONResponse:
        try:
            point = self.artifacts.calibration.operating_point(
                operating_point or self.settings.operating_point
            )
        except KeyError:
            exc = InputRejectedError(
                "unknown_operating_point",
                f"unknown operating point {operating_point!r}; valid: "
                f"{', '.join(self.artifacts.calibration.names)}",
            )
            self.metrics.reject(exc.reason)
            return rejection(exc)
        try:
            out = await self.batcher.submit(x)
        except Exception as exc:  # Triton down or past its timeout, an ONNX Runtime error: not a 500
            log.warning("%s backend failed: %s", self.backend.name, exc)
            self.metrics.backend_error()
            return backend_unavailable(self.backend.name, exc)
        answers = decide(out.logits, out.selection, point, self.class_names)
        self.metrics.observe_decisions(point.name, [a["decision"] for a in answers], out.selection)
        return {
            "model": self.artifacts.name,
            "version": self.artifacts.version,
            "operating_point": point.name,
            "predictions": answers,
        }

    @bentoml.api(route="/predict")
    async def predict(self, pixels: list[Any], operating_point: str | None = None) -> dict[str, Any]:
        """Predict or abstain for one image ``[C, H, W]`` or a batch ``[N, C, H, W]`` (pixels in [0, 1])."""
        try:
            x = parse_pixels(pixels, self.model.input_spec, self.settings.max_batch)
        except InputRejectedError as exc:
            self.metrics.reject(exc.reason)
            return rejection(exc)  # type: ignore[return-value]  # a Response is sent as it is
        return await self._decide(x, operating_point)  # type: ignore[return-value]

    @bentoml.api(route="/predict_image")
    async def predict_image(self, image: Path, operating_point: str | None = None) -> dict[str, Any]:
        """Predict or abstain for one PNG or JPEG upload, converted to the graph's input spec."""
        try:
            x = decode_image(Path(image).read_bytes(), self.model.input_spec)
        except InputRejectedError as exc:
            self.metrics.reject(exc.reason)
            return rejection(exc)  # type: ignore[return-value]
        return await self._decide(x, operating_point)  # type: ignore[return-value]


Abstain.add_asgi_middleware(CountFrameworkRejections)
Abstain.add_asgi_middleware(CheckUploadForms)
Abstain.add_asgi_middleware(LimitJsonBody)
