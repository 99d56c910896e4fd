"""The Open Inference Protocol's REST endpoints (``/v2``) of ``abstain serve``, next to ``/predict``.

kserve/open-inference-protocol ``specification/protocol/inference_rest.md``: ``GET /v2`` (server
metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}[/versions/
{version}]`` (model metadata), ``…/ready``, ``POST …/infer``; Triton's binary tensor data
extension both ways, and gzip/deflate bodies as ``tritonclient.http`` sends and asks for them
(``Content-Encoding`` / ``Accept-Encoding``). The tensors are :mod:`abstain.serving.http.open_inference`'s;
the decision is the service's one path (:meth:`ServiceContract.decide_batch`): the same checks,
metrics, decision store and error answers (:func:`abstain.serving.http.responses.error_response`)
as ``/predict``. Errors are 4xx ``{"error": "…"}`` (plus ``reason``, as on ``/predict``); an
unknown model or version is 404. BentoML's ``max_concurrency`` (429) and request timeout (504)
wrap these routes as they wrap ``/predict``.

Body limit: BentoML has none, so an infer body is bounded here as ``/predict``'s is by
:class:`abstain.serving.http.middleware.LimitPredictBody` — ``max_body_bytes(npy=True)`` for a
binary body (``Inference-Header-Content-Length`` present), ``max_body_bytes()`` for JSON — as
received and again as decompressed, so a small gzip bomb is refused with 413 after inflating at
most the limit.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import zlib
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from abstain import __version__
from abstain.contract import INPUT_NAME
from abstain.serving.http.contract import ServiceContract, ServiceProvider, current_service
from abstain.serving.http.open_inference import (
    EXTENSIONS,
    HEADER_LENGTH,
    OUTPUT_DATATYPES,
    InferRequest,
    available_outputs,
    bad_request,
    encode_infer_response,
    output_arrays,
    parse_infer_request,
    split_body,
)
from abstain.serving.http.responses import error_response
from abstain.serving.http.validation import InputRejectedError

#: ``GET /v2``'s ``name``.
SERVER_NAME = "abstain"
#: Bodies at least this large are decompressed, decoded and checked on a thread, off the event loop.
THREAD_BYTES = 256 * 1024
#: What is read and dropped of a refused body, so that the client sees the 413, not a reset.
DRAIN_BYTES = 64 * 1024 * 1024


def server_metadata() -> dict[str, Any]:
    """``GET /v2`` (inference_rest.md, "Server Metadata Response JSON Object")."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(service: ServiceContract) -> dict[str, Any]:
    """``GET /v2/models/{name}`` (inference_rest.md, "Model Metadata Response JSON Object").

    ``pixels`` is declared FP32 (UINT8 0–255 is taken too); the outputs are those of
    :data:`OUTPUT_DATATYPES` the graph has, with ``-1`` for the batch dimension."""
    meta = service.metadata()
    k = len(service.class_names)
    outputs = available_outputs(service.graph_outputs)
    shapes = {"logits": [-1, k]}
    return {
        "name": meta["model"],
        "versions": [meta["version"]],
        "platform": "abstain_selective",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *service.input_spec.shape]}],
        "outputs": [
            {"name": n, "datatype": OUTPUT_DATATYPES[n], "shape": shapes.get(n, [-1])} for n in outputs
        ],
    }


def error(message: str, status: int) -> JSONResponse:
    """A protocol error answer that is no rejected input (unknown model, not ready)."""
    return JSONResponse({"error": message}, status_code=status)


def unknown_model(service: ServiceContract, name: str, version: str | None) -> JSONResponse | None:
    """404 unless ``name`` (and ``version``, if given) is the model served."""
    served, served_version = service.served_model  # per request: not the whole metadata()
    if name == served and version in (None, served_version):
        return None
    asked = name if version is None else f"{name} version {version}"
    return error(f"unknown model {asked[:140]!r}; valid: {served} (version {served_version})", 404)


def _codecs(encoding: str) -> list[int]:
    """zlib ``wbits`` to try for a ``Content-Encoding``: gzip; deflate as zlib (RFC 9110 §8.4.1.2,
    what tritonclient sends), then raw deflate (what some clients send)."""
    return {"gzip": [31], "x-gzip": [31], "deflate": [15, -15]}[encoding]


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` inflated, at most ``limit`` bytes of output ever held; 413 beyond, 400 if corrupt."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise bad_request(
            f"Content-Encoding {encoding[:40]!r} is not supported; valid: gzip, deflate or none"
        )
    problem = ""
    for wbits in _codecs(encoding):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)  # max_length: a bomb stops here
        except zlib.error as exc:
            problem = str(exc)
            continue
        if len(out) > limit:
            raise InputRejectedError(
                "batch_too_large",
                f"the {encoding} request body inflates to more than {limit} bytes; valid: a body of at "
                "most that many bytes once decompressed (ABSTAIN_MAX_REQUEST_BYTES, JSON half of it)",
            )
        if not inflater.eof or inflater.unused_data:
            problem = "truncated, or followed by other bytes"
            continue
        return out
    raise bad_request(f"the request body is not valid {encoding} data ({problem})")


def response_encoding(accept: str) -> str | None:
    """The encoding to answer with for an ``Accept-Encoding`` header: gzip, deflate or none."""
    offered: dict[str, float] = {}
    for part in accept.lower().split(","):
        token, _, q = part.strip().partition(";")
        try:
            weight = float(q.strip()[2:]) if q.strip().startswith("q=") else 1.0
        except ValueError:
            weight = 0.0
        offered[token.strip()] = weight
    for encoding in ("gzip", "deflate"):
        if offered.get(encoding, 0.0) > 0:
            return encoding
    return None


def compress(body: bytes, encoding: str) -> bytes:
    """``body`` as tritonclient decompresses it: ``gzip.decompress`` / ``zlib.decompress``."""
    return gzip.compress(body, compresslevel=1) if encoding == "gzip" else zlib.compress(body, 1)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 ``batch_too_large`` past ``limit`` bytes (by
    ``Content-Length`` before reading, or as streamed); at most the limit is buffered."""
    length = request.headers.get("content-length", "")
    too_large = length.isdigit() and int(length) > limit
    body, seen = bytearray(), 0
    stream = request.stream()
    async for chunk in stream:
        seen += len(chunk)
        if too_large or seen > limit:
            too_large = True
            body.clear()
            if seen > DRAIN_BYTES:  # let the client finish sending, keep nothing
                break
            continue
        body += chunk
    if too_large:
        raise InputRejectedError(
            "batch_too_large",
            f"the request body is larger than {limit} bytes (ABSTAIN_MAX_REQUEST_BYTES, JSON half of it); "
            "valid: at most max_batch images as binary tensor data, or max_json_batch as JSON tensor data "
            "(GET /metadata)",
        )
    return bytes(body)


def routes(service: ServiceProvider) -> list[Route]:
    """The ``/v2`` routes, each reaching the service through ``service``."""

    async def server(_: Request) -> Response:
        return JSONResponse(server_metadata())

    async def live(_: Request) -> Response:
        return Response(status_code=200)

    async def ready(_: Request) -> Response:
        # inference_rest.md, "Health": 200 is true, a 4xx false
        current = service()
        if current is None or not current.__is_ready__():
            return error("the service is not ready (starting, or its backend is unavailable)", 400)
        return Response(status_code=200)

    def addressed(request: Request) -> ServiceContract | Response:
        """The service a model route addresses, or the answer why not (503 starting, 404 unknown)."""
        current = service()
        if current is None:
            return error("service is starting", 503)
        p = request.path_params
        missing = unknown_model(current, p["name"], p.get("version"))
        return current if missing is None else missing

    async def model(request: Request) -> Response:
        current = addressed(request)
        if isinstance(current, Response):
            return current
        return JSONResponse(model_metadata(current))

    async def model_ready(request: Request) -> Response:
        current = addressed(request)
        if isinstance(current, Response):
            return current
        if not current.__is_ready__():
            return error(
                f"model {request.path_params['name']!r} is not ready (its backend is unavailable)", 400
            )
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        p = request.path_params
        return await infer_answer(service(), request, p["name"], p.get("version"))

    paths: list[Route] = [
        Route("/v2", server, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        paths += [
            Route(base, model, methods=["GET"]),
            Route(f"{base}/ready", model_ready, methods=["GET"]),
            Route(f"{base}/infer", infer, methods=["POST"]),
        ]
    return paths


async def infer_answer(
    current: ServiceContract | None, request: Request, name: str, version: str | None
) -> Response:
    """The answer to ``POST /v2/models/{name}[/versions/{version}]/infer`` (route and fast path)."""
    if current is None:
        return error("service is starting", 503)
    if (missing := unknown_model(current, name, version)) is not None:
        return missing
    try:
        return await _infer(current, request)
    except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to count
        return error("the client disconnected before sending the whole body", 400)
    except Exception as exc:  # one mapping of errors to answers, as /predict's
        return error_response(exc, current.metrics)


#: ``/v2/models/{name}/infer`` and ``/v2/models/{name}/versions/{version}/infer``
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class V2Infer:
    """ASGI middleware: ``POST …/infer`` answered before BentoML routes the request to the mounted
    Starlette app, as :class:`abstain.serving.http.middleware.NpyPredict` answers ``.npy`` bodies
    (measured here on digits, one client: 389 → 519 requests/s with the rest unchanged); the same
    :func:`infer_answer` as the route."""

    def __init__(self, app: ASGIApp, service: ServiceProvider = current_service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        answer = await infer_answer(self.service(), request, match["name"], match["version"])
        await answer(scope, receive, send)


async def _infer(service: ServiceContract, request: Request) -> Response:
    """``POST …/infer``: read, inflate, decode and check the body; decide; encode the outputs."""
    header_length = request.headers.get(HEADER_LENGTH)
    limit = service.max_body_bytes(npy=header_length is not None)
    body = await read_body(request, limit)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    settings = service.settings

    def decode() -> InferRequest:
        payload, binary = split_body(decompress(body, encoding, limit), header_length)
        return parse_infer_request(
            payload,
            binary,
            service.input_spec,
            settings.json_batch,
            settings.max_batch,
            available_outputs(service.graph_outputs),
        )

    loop = asyncio.get_running_loop()
    # a compressed body may inflate up to the limit: off the loop unless it is tiny
    compressed = encoding not in ("", "identity")
    big = len(body) >= (THREAD_BYTES // 64 if compressed else THREAD_BYTES)
    parsed = await loop.run_in_executor(None, decode) if big else decode()
    decided = await service.decide_batch(parsed.pixels, parsed.operating_point, parsed.request_ids)
    out, json_length = encode_infer_response(parsed, decided, output_arrays(decided, service.class_names))
    headers = (
        {"content-type": "application/json"}
        if json_length is None
        else {
            "content-type": "application/octet-stream",
            HEADER_LENGTH: str(json_length),
        }
    )
    if (answer_encoding := response_encoding(request.headers.get("accept-encoding", ""))) is not None:
        out = compress(out, answer_encoding)
        headers["content-encoding"] = answer_encoding
    return Response(out, headers=headers)
