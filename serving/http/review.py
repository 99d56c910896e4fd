"""The review queue: abstained inputs kept for people to label (opt-in, ``ABSTAIN_REVIEW_QUEUE``).

An abstention's "candidate for human review" goes somewhere: with ``ABSTAIN_REVIEW_QUEUE=N``
the service keeps the pixels the model saw for up to ``N`` abstentions (and at most
``ABSTAIN_REVIEW_MAX_BYTES`` of pixels; the oldest are dropped first) with their request
id, candidate and score, in the decision store beside the decisions.

* ``GET /review?offset=0&limit=50`` lists the unlabelled items, oldest first;
* ``GET /review/{request_id}`` returns one as a PNG (8-bit; the stored pixels are float32);
* ``POST /feedback`` with the item's request id labels it: it leaves the queue and waits for
  ``abstain review export DIR`` (:mod:`abstain.serving.cli`), which writes the labelled
  items as a dataset that ``abstain calibrate`` / ``evaluate`` (and ``abstain train``) read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from abstain.serving.http.contract import ServiceContract, ServiceProvider
from abstain.serving.store.decision_store import ReviewItem
from abstain.serving.store.recorder import StoreUnavailableError
from abstain.serving.store.review_export import item_pixels, to_png

if TYPE_CHECKING:
    from abstain.serving.store.live import DecisionLog

#: Most items one ``GET /review`` page lists.
MAX_PAGE = 500


def describe(item: ReviewItem, class_names: list[str]) -> dict[str, Any]:
    """One item of the ``GET /review`` listing (without its pixels); its candidate carries the
    abstention's prediction set as the answer gave it, when its operating point had sets."""
    candidate: dict[str, Any] = {
        "label": class_names[item.candidate] if 0 <= item.candidate < len(class_names) else None,
        "class_index": item.candidate,
        "confidence": item.confidence,
    }
    if item.prediction_set is not None:
        indices = item.prediction_set["class_indices"]
        candidate["prediction_set"] = {
            "labels": [class_names[k] if 0 <= k < len(class_names) else None for k in indices],
            **item.prediction_set,
        }
    return {
        "request_id": item.request_id,
        "time": item.t,
        "model": item.model,
        "version": item.version,
        "operating_point": item.operating_point,
        "candidate": candidate,
        "score_value": item.score,
        # inf: a class-conditional point's class that is never answered (JSON has no inf)
        "threshold": None if math.isinf(item.threshold) else item.threshold,
        "shape": list(item.shape),
        "image": f"/review/{item.request_id}",
    }


def _error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status)


def _log_or_error(service: ServiceContract | None) -> tuple[DecisionLog | None, JSONResponse | None]:
    if service is None:
        return None, _error(503, "store_unavailable", "service is starting")
    if service.decision_log is None or not service.decision_log.review:
        return None, _error(
            404, "review_off",
            "the review queue is off: start the service with ABSTAIN_REVIEW_QUEUE=<items> "
            "(and a decision store, ABSTAIN_STORE=sqlite or a postgresql:// URL)",
        )  # fmt: skip
    return service.decision_log, None


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ValueError(f"{name} should be an integer in [{lo}, {hi}], but got {raw!r}")
    return int(raw)


async def review_list(request: Request, service: ServiceContract | None) -> JSONResponse:
    """``GET /review?offset=&limit=``: unlabelled review items, oldest first."""
    log, error = _log_or_error(service)
    if error is not None:
        return error
    assert log is not None and service is not None  # _log_or_error gave no error
    try:
        offset = _int_param(request, "offset", 0, 0, 10**12)
        limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
    except ValueError as exc:
        return _error(400, "bad_query", str(exc))
    try:
        total, items = await log.recorder.call(lambda store: store.review_page(offset, limit))
    except StoreUnavailableError as exc:
        return _error(503, "store_unavailable", f"{exc}; retry later")
    return JSONResponse(
        {
            "total": total,
            "offset": offset,
            "limit": limit,
            "items": [describe(i, list(service.class_names)) for i in items],
        }
    )


async def review_image(request: Request, service: ServiceContract | None) -> Response:
    """``GET /review/{request_id}``: the kept input as a PNG (labelled or not, until exported or dropped)."""
    log, error = _log_or_error(service)
    if error is not None:
        return error
    assert log is not None  # _log_or_error gave no error
    request_id = request.path_params["request_id"]
    try:
        item = await log.recorder.call(lambda store: store.review_item(request_id))
    except StoreUnavailableError as exc:
        return _error(503, "store_unavailable", f"{exc}; retry later")
    if item is None:
        return _error(
            404, "unknown_request_id",
            f"no review item {request_id[:140]!r}: not an abstention kept here, or dropped by the "
            "queue's bounds (ABSTAIN_REVIEW_QUEUE, ABSTAIN_REVIEW_MAX_BYTES); GET /review lists them",
        )  # fmt: skip
    return Response(to_png(item_pixels(item)), media_type="image/png")


def routes(service: ServiceProvider) -> list[Route]:
    """The review queue of the service ``service()`` returns."""

    async def listing(request: Request) -> Response:
        return await review_list(request, service())

    async def image(request: Request) -> Response:
        return await review_image(request, service())

    return [
        Route("/review", listing, methods=["GET"]),
        Route("/review/{request_id}", image, methods=["GET"]),
    ]
