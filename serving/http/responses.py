"""The service's answers and error answers, and the one place a domain error becomes HTTP.

:func:`error_response` maps what the service raises to its answer and counts it: a rejected
input (:class:`~abstain.serving.http.validation.InputRejectedError`) is a 4xx ``{"error",
"reason"}`` counted in ``abstain_rejected_inputs_total``; a failed backend a 503 counted in
``abstain_backend_errors_total``; anything else is a bug in our code: a 500, logged with its
traceback and counted in ``abstain_internal_errors_total`` — never blamed on the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import JSONResponse, Response

from abstain.serving.http.validation import InputRejectedError
from abstain.serving.inference.backends import BackendUnavailableError, ServedGraphMismatchError

if TYPE_CHECKING:
    from abstain.serving.http.answers import PredictResponse
    from abstain.serving.metrics import ServiceMetrics

log = logging.getLogger("bentoml.abstain")

#: Header on the service's own 4xx answers, so that the middleware does not count them twice.
REJECTED_HEADER = "x-abstain-rejected"
STATUS = {"batch_too_large": 413}  # every other rejection is a 400


class AnswerResponse(JSONResponse):
    """The JSON answer to ``POST /predict``, written by orjson: the same compact JSON as
    Starlette's ``JSONResponse``, faster (docs/benchmarks.md). The answer holds only str, int,
    float, bool, list and dict."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def rejection(exc: InputRejectedError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.message, "reason": exc.reason},
        status_code=STATUS.get(exc.reason, 400),
        headers={REJECTED_HEADER: exc.reason},
    )


def backend_unavailable(exc: BackendUnavailableError) -> JSONResponse:
    """503 for a failed forward pass: the input was fine, the backend was not (retry later)."""
    return JSONResponse(
        {"error": f"{exc}; the request was valid, retry later", "reason": exc.reason}, status_code=503
    )


def graph_mismatch(exc: ServedGraphMismatchError) -> JSONResponse:
    """503 while Triton serves another graph than the calibrated one: these thresholds do not apply."""
    return JSONResponse(
        {
            "error": f"the Triton backend does not serve the calibrated graph ({exc.detail[:400]}); no "
            "answer is given with thresholds calibrated for another graph; the request was valid, "
            "retry later",
            "reason": exc.reason,
        },
        status_code=503,
    )


def internal_error(exc: BaseException) -> JSONResponse:
    """500 for a bug in the service's code: the body says so, the log has the traceback."""
    return JSONResponse(
        {
            "error": f"internal error of the abstain service ({type(exc).__name__}); it is logged "
            "with its traceback; the request may have been valid",
            "reason": "internal_error",
        },
        status_code=500,
    )


def error_response(exc: Exception, metrics: ServiceMetrics | None) -> JSONResponse:
    """The answer to ``exc`` raised while serving a request, counted in ``metrics`` (if any)."""
    if isinstance(exc, InputRejectedError):
        if metrics is not None:
            metrics.reject(exc.reason)
        return rejection(exc)
    if isinstance(exc, BackendUnavailableError):
        log.warning("%s", exc)
        if metrics is not None:
            metrics.backend_error()
        return graph_mismatch(exc) if isinstance(exc, ServedGraphMismatchError) else backend_unavailable(exc)
    log.error("internal error while answering a request", exc_info=exc)
    if metrics is not None:
        metrics.internal_error()
    return internal_error(exc)


async def respond(work: Awaitable[PredictResponse], metrics: ServiceMetrics | None) -> Response:
    """The answer of ``work`` (a ``POST /predict``), or the error answer of what it raised."""
    try:
        return AnswerResponse(await work)
    except Exception as exc:
        return error_response(exc, metrics)
