"""ASGI middlewares of the service: what BentoML 1.4 does not do for us before our code runs.

* :class:`LimitPredictBody` — a request-size limit on ``POST /predict`` (BentoML has none);
* :class:`NpyPredict` — ``POST /predict`` with a binary ``.npy`` body;
* :class:`JsonPredict` — ``POST /predict`` with a JSON body, without BentoML's per-request IO cost;
* :class:`CheckUploadForms` — a 400 instead of BentoML's 500 for malformed upload forms;
* :class:`CountFrameworkRejections` — BentoML's own 4xx answers counted as rejected inputs;
* :class:`RequestTimeout` — BentoML's request timeout without its leak (see :func:`install_request_timeout`).

Each is given a :data:`~abstain.serving.http.contract.ServiceProvider` (by default this
worker's service, from BentoML) and asks it per request, never at import time; errors become
answers in one place, :func:`abstain.serving.http.responses.error_response`.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import orjson
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from abstain.serving.http.contract import ServiceContract, ServiceProvider, current_service
from abstain.serving.http.responses import REJECTED_HEADER, error_response, respond
from abstain.serving.http.validation import MAX_IMAGE_BYTES, NPY_MEDIA_TYPE, InputRejectedError, parse_pixels

if TYPE_CHECKING:
    from abstain.serving.metrics import RejectReason


class CountFrameworkRejections:
    """ASGI middleware: count 4xx answers that BentoML gives before our code runs.

    Malformed JSON and bodies that do not match the endpoint's schema are answered 400 by
    BentoML's request parsing; they are still rejected inputs, so they reach
    ``abstain_rejected_inputs_total`` here (``bad_json`` for ``/predict``, ``bad_image`` for
    ``/predict_image``). Answers carrying :data:`REJECTED_HEADER` were counted already.
    """

    REASONS: ClassVar[dict[str, RejectReason]] = {"/predict": "bad_json", "/predict_image": "bad_image"}

    def __init__(self, app: ASGIApp, service: ServiceProvider = current_service) -> None:
        self.app, self.service = app, service

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
                service = self.service()
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


class LimitPredictBody:
    """ASGI middleware: answer 413 ``batch_too_large`` to a ``/predict`` body no valid request needs.

    BentoML 1.4 has no request-size limit, and the batch limits are only checked after the
    whole body is parsed: a huge body could take a worker's memory first. The limit
    (:meth:`ServiceContract.max_body_bytes`) is the smaller of ``ABSTAIN_MAX_REQUEST_BYTES``
    (for JSON, half of it: parsed JSON costs ~23 bytes of memory per body byte,
    docs/benchmarks.md) and what the largest valid request needs: for JSON,
    :data:`BYTES_PER_NUMBER` per pixel (``0.12345678901234568, `` is 21, an exponent form 24)
    times ``max_json_batch · C · H · W`` plus :data:`SLACK_BYTES`; for ``.npy``, 4 bytes per
    pixel times ``max_batch · C · H · W`` plus :data:`SLACK_BYTES`. A ``Content-Length`` over
    it is refused before reading; a body without one is read up to the limit and refused once
    it passes it; at most the limit is ever buffered. The rest of a refused body is read and
    dropped (up to :data:`DRAIN_BYTES`, no memory kept) so that the client, still sending,
    sees the 413 instead of a reset connection.
    """

    PATH = "/predict"
    BYTES_PER_NUMBER = 25
    SLACK_BYTES = 64 * 1024
    DRAIN_BYTES = 64 * 1024 * 1024

    def __init__(self, app: ASGIApp, service: ServiceProvider = current_service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.PATH or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        # only now: asked during the lifespan start-up, it would wait for the service being built
        service = self.service()
        if service is None:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        npy = is_npy(headers)
        limit = service.max_body_bytes(npy=npy)
        length = headers.get("content-length")
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
            settings, shape = service.settings, list(service.input_spec.shape)
            exc = InputRejectedError(
                "batch_too_large",
                f"the request body is larger than {limit} bytes (ABSTAIN_MAX_REQUEST_BYTES "
                f"{settings.max_request_bytes}, JSON half of it); valid: at most {settings.json_batch} "
                f"images of {shape} as compact JSON, or {settings.max_batch} as a .npy body "
                f"({NPY_MEDIA_TYPE}), within that many bytes",
            )
            return await error_response(exc, service.metrics)(scope, receive, send)

        await self.app(scope, replay_receive(bytes(body), receive), send)


def is_npy(headers: Headers) -> bool:
    """Whether the request's ``Content-Type`` is :data:`NPY_MEDIA_TYPE` (parameters ignored)."""
    return headers.get("content-type", "").split(";")[0].strip().lower() == NPY_MEDIA_TYPE


class NpyPredict:
    """ASGI middleware: ``POST /predict`` with a ``.npy`` body (``Content-Type: application/x-npy``).

    BentoML's endpoint takes JSON; a binary array is answered here, before BentoML's request
    parsing, through the same service method as JSON (:meth:`Abstain.predict_npy`): the same
    checks, errors, metrics and answers. The operating point and request ids come from the
    query string (``/predict?operating_point=coverage-0.9&request_id=a&request_id=b``). Sits
    inside :class:`LimitPredictBody`, so the body is bounded before it is read here.
    """

    PATH = "/predict"

    def __init__(self, app: ASGIApp, service: ServiceProvider = current_service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("path") != self.PATH
            or scope.get("method") != "POST"
            or not is_npy(Headers(scope=scope))
        ):
            return await self.app(scope, receive, send)
        service = self.service()
        if service is None:
            starting = JSONResponse({"error": "service is starting"}, status_code=503)
            return await starting(scope, receive, send)
        request = Request(scope, receive)
        body = await request.body()
        query = request.query_params
        work = service.predict_npy(body, query.get("operating_point"), query.getlist("request_id"))
        await (await respond(work, service.metrics))(scope, receive, send)


class JsonPredict:
    """ASGI middleware: ``POST /predict`` with a JSON body, parsed here instead of by BentoML.

    BentoML's request and response handling (a pydantic model per request, a JSON schema per
    response, its IO descriptors) cost more per request than the whole decision for a small
    image (docs/benchmarks.md, "Measurements behind design choices"). The body —
    ``{"pixels": [...], "operating_point": ..., "request_id": ...}`` — is parsed with
    :func:`loads_json` (on a thread when large), checked with the same messages and reasons as
    BentoML's schema gave (``bad_json``), and answered by the same service method as the
    BentoML endpoint (:meth:`ServiceContract.predict_array`). BentoML's ``/predict`` endpoint stays
    for its OpenAPI schema and for anything this does not take.
    """

    PATH = "/predict"
    FIELDS = ("pixels", "operating_point", "request_id")
    VALID = (
        'valid: a JSON object {"pixels": [[[...]]], "operating_point": "<name>" (optional), '
        '"request_id": "<id>" or ["<id>", ...] (optional)}'
    )
    #: bodies at least this large are decoded and converted on a thread, off the event loop
    THREAD_BYTES = 256 * 1024

    def __init__(self, app: ASGIApp, service: ServiceProvider = current_service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.PATH or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        media_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
        service = self.service() if media_type == "application/json" else None
        if service is None:
            return await self.app(scope, receive, send)
        body = await Request(scope, receive).body()
        try:
            if len(body) >= self.THREAD_BYTES:
                x, operating_point, request_id = await asyncio.get_running_loop().run_in_executor(
                    None, self._pixels, body, service
                )
            else:
                x, operating_point, request_id = self._pixels(body, service)
        except InputRejectedError as exc:
            return await error_response(exc, service.metrics)(scope, receive, send)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            rejected = InputRejectedError("bad_json", f"Invalid JSON: {exc}; {self.VALID}")
            return await error_response(rejected, service.metrics)(scope, receive, send)
        work = service.predict_array(x, operating_point, request_id)
        await (await respond(work, service.metrics))(scope, receive, send)

    def _pixels(self, body: bytes, service: ServiceContract) -> tuple[np.ndarray, str | None, Any]:
        """The body decoded and its pixels checked and converted: ``(x float32 [N, C, H, W],
        operating_point, request_id)``. One function, so that for a big body (on a thread) the
        decoded lists are also freed there, not on the event loop."""
        pixels, operating_point, request_id = self._fields(loads_json(body))
        x = parse_pixels(pixels, service.input_spec, service.settings.json_batch)
        return x, operating_point, request_id

    def _fields(self, payload: Any) -> tuple[list[Any], str | None, Any]:
        def bad(message: str) -> InputRejectedError:
            return InputRejectedError("bad_json", f"{message}; {self.VALID}")

        if not isinstance(payload, dict):
            raise bad(f"the body should be a JSON object, but got a {type(payload).__name__}")
        if "pixels" not in payload:
            raise bad("field 'pixels' is required")
        pixels, operating_point = payload["pixels"], payload.get("operating_point")
        if not isinstance(pixels, list):
            raise bad(f"field 'pixels' should be an array, but got a {type(pixels).__name__}")
        if operating_point is not None and not isinstance(operating_point, str):
            kind = type(operating_point).__name__
            raise bad(f"field 'operating_point' should be a string, but got a {kind}")
        return pixels, operating_point, payload.get("request_id")


def loads_json(body: bytes) -> Any:
    """``json.loads(body)``, by orjson when it can.

    orjson decodes a JSON body of numbers several times faster and, like ``json.loads``, holds
    the GIL throughout, so the event loop waits less behind a big body decoded on a thread. What
    orjson refuses goes to ``json.loads``, so that the answer is the standard library's:
    ``NaN``/``Infinity`` literals (then ``non_finite``, not ``bad_json``), UTF-16/32 bodies,
    integers beyond 64 bits, and the ``bad_json`` messages of a malformed body.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


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

    def __init__(self, app: ASGIApp, service: ServiceProvider = current_service) -> None:
        self.app, self.service = app, service

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
            service = self.service()
            metrics = service.metrics if service is not None else None
            return await error_response(exc, metrics)(scope, receive, send)

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


class RequestTimeout:
    """ASGI middleware: answer 504 when a request has not started its answer within ``timeout`` s.

    The same contract as BentoML 1.4's ``TimeoutMiddleware`` (``bentoml/_internal/server/http/
    traffic.py``: same constructor, same 504 body), with one difference that matters: BentoML
    arms ``loop.call_later(timeout, …)`` for every request and never cancels it, so each
    finished request (its future, task, context and tracing objects) stays reachable from the
    event loop's timer heap for the whole timeout, and every generation-2 garbage collection
    walks them all: stalls that grow with the request rate and the timeout (docs/benchmarks.md,
    "Measurements behind design choices"). Here the timer is cancelled
    as soon as the answer starts or the request ends, so a finished request is garbage at once.
    """

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # done when the answer starts (or the app ends)

        async def timed_send(message: Message) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        async def run() -> None:
            await self.app(scope, receive, timed_send)

        def ended(_: asyncio.Task[None]) -> None:
            if not started.done():
                started.set_result(None)

        task = loop.create_task(run())
        task.add_done_callback(ended)
        timer = loop.call_later(self.timeout, _expire, started)
        try:
            await started
        except asyncio.TimeoutError:
            if task.cancel():
                answer = JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
                )
                await answer(scope, receive, send)
            return
        except asyncio.CancelledError:  # the server is shutting down or the client went away
            task.cancel()
            raise
        finally:
            timer.cancel()  # the whole point: no handle keeps this request alive after it ends
        await task


def _expire(started: asyncio.Future[Any]) -> None:
    if not started.done():
        started.set_exception(asyncio.TimeoutError())


def install_request_timeout() -> None:
    """Make BentoML build :class:`RequestTimeout` where it would build its own ``TimeoutMiddleware``.

    BentoML 1.4 adds the timeout middleware in ``BaseAppFactory.middlewares``, which imports
    the class from ``bentoml._internal.server.http.traffic`` each time it builds the app (in
    the worker, after importing this service): rebinding the module attribute swaps it for
    every app built afterwards, with no copy of BentoML's app factory. ``traffic={"timeout"}``
    of the service keeps configuring it. Checked by ``tests/serving/test_request_timeout.py``.
    """
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = RequestTimeout  # type: ignore[misc,assignment]
