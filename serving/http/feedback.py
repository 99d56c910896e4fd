"""``POST /feedback``: delayed ground truth joined to recorded decisions.

``POST /feedback`` takes one ``{"request_id": ..., "label": ...}`` or a JSON list of them (at
most :data:`MAX_LABELS`). ``label`` is a class name (``GET /metadata``'s ``classes``) or a
class index. A batch is applied all or none, so a client can retry it unchanged:

====  ======================  ==================================================================
code  reason                  when
====  ======================  ==================================================================
200                           every label applied; ``results`` says, per id, whether it was right
400   ``bad_feedback``        not JSON, wrong shape, a bad or repeated request id in the batch
400   ``unknown_label``       a label that is neither a class name nor a class index
404   ``unknown_request_id``  never answered here, dropped by retention, or not yet recorded
409   ``duplicate``           already labelled
503   ``store_unavailable``   the store is off (``ABSTAIN_STORE=off``) or failing
====  ======================  ==================================================================

Each outcome is counted in ``abstain_feedback_total{result=...}`` (per label).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from abstain.serving.http.contract import ServiceContract, ServiceProvider
from abstain.serving.http.request_ids import REQUEST_ID
from abstain.serving.store.decision_store import LabelConflictError
from abstain.serving.store.live import FeedbackResult
from abstain.serving.store.recorder import StoreUnavailableError

#: Most labels in one ``POST /feedback``, and most bytes of its body (about 1 KB a label is ample).
MAX_LABELS = 1000
MAX_BODY_BYTES = 1024 * 1024


class FeedbackError(Exception):
    """A refused ``/feedback``: ``status``, ``reason`` (the counter's result) and ``count`` labels."""

    def __init__(
        self,
        status: int,
        reason: FeedbackResult | Literal["store_unavailable"],
        message: str,
        count: int = 1,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.count, self.extra = status, reason, message, count, extra

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message, "reason": self.reason, **self.extra}, status_code=self.status
        )


FORMAT = (
    'valid: {"request_id": "<id from an answer>", "label": "<class name>" or <class index>}, '
    f"or a JSON list of at most {MAX_LABELS} of them"
)


def parse_labels(body: bytes, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """A ``/feedback`` body → ``[(request_id, class_index), ...]``; raises :class:`FeedbackError` (400)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FeedbackError(400, "bad_feedback", f"the body is not JSON; {FORMAT}") from None
    items = data if isinstance(data, list) else [data]
    if not items or len(items) > MAX_LABELS:
        raise FeedbackError(400, "bad_feedback", f"the body holds {len(items)} labels; {FORMAT}")
    out: list[tuple[str, int]] = []
    unknown: list[Any] = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise FeedbackError(
                400, "bad_feedback", f"a label entry is {keys}, not request_id and label; {FORMAT}"
            )
        rid, label = item["request_id"], item["label"]
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
            raise FeedbackError(400, "bad_feedback", f"request_id {rid!r} is malformed; {FORMAT}")
        index = class_index(label, class_names)
        if index is None:
            unknown.append(label)
        out.append((rid, index if index is not None else -1))
    if unknown:
        raise FeedbackError(
            400,
            "unknown_label",
            f"unknown labels {unknown[:10]}; valid: a class name ({', '.join(class_names)}) "
            f"or a class index 0-{len(class_names) - 1}; nothing was applied",
            count=len(unknown),
        )
    seen: set[str] = set()
    repeated = [rid for rid, _ in out if rid in seen or seen.add(rid)]  # type: ignore[func-returns-value]
    if repeated:
        raise FeedbackError(
            400,
            "bad_feedback",
            f"the batch labels {repeated[:10]} more than once; {FORMAT}",
            count=len(repeated),
        )
    return out


def class_index(label: Any, class_names: Sequence[str]) -> int | None:
    """A label given as a class name or index → its index, or ``None`` if it is neither."""
    if isinstance(label, str) and label in class_names:
        return list(class_names).index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(class_names):
        return label
    return None


async def feedback(request: Request, service: ServiceContract | None) -> JSONResponse:
    """``POST /feedback`` (see the module docstring) to ``service``."""
    if service is None:
        return JSONResponse({"error": "service is starting", "reason": "store_unavailable"}, status_code=503)
    log = service.decision_log
    try:
        if log is None:
            raise FeedbackError(
                503,
                "store_unavailable",
                "the decision store is off (ABSTAIN_STORE=off): there are no decisions to label; "
                "start the service with ABSTAIN_STORE=sqlite or a postgresql:// URL",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:  # never buffer an unbounded body
                raise FeedbackError(
                    413, "bad_feedback", f"the body is larger than {MAX_BODY_BYTES} bytes; {FORMAT}"
                )
        labels = parse_labels(bytes(body), service.class_names)
        try:
            decisions = await log.label(labels)
        except LabelConflictError as exc:
            if exc.unknown:
                raise FeedbackError(
                    404,
                    "unknown_request_id",
                    f"unknown request ids {exc.unknown[:10]}: never answered here, dropped by retention, "
                    "or not recorded yet (decisions are written within 0.1 s; retry); "
                    "nothing was applied",
                    count=len(exc.unknown),
                    unknown=exc.unknown,
                    duplicate=exc.duplicate,
                ) from None
            raise FeedbackError(
                409,
                "duplicate",
                f"request ids {exc.duplicate[:10]} are labelled already; a label cannot be changed; "
                "nothing was applied",
                count=len(exc.duplicate),
                duplicate=exc.duplicate,
            ) from None
        except StoreUnavailableError as exc:
            raise FeedbackError(
                503, "store_unavailable", f"{exc}; nothing was applied; retry later"
            ) from None
    except FeedbackError as exc:
        if log is not None and exc.reason != "store_unavailable":
            log.metrics.feedback.labels(exc.reason).inc(exc.count)
        return exc.response()
    log.metrics.feedback.labels("accepted").inc(len(decisions))
    results = [
        {
            "request_id": d.request_id,
            "operating_point": d.operating_point,
            "decision": d.decision,
            "label": service.class_names[label],
            # an abstention is neither right nor wrong; its candidate is reported for review
            "correct": (d.class_index == label) if d.decision == "predict" else None,
        }
        for d, (_, label) in zip(decisions, labels, strict=True)
    ]
    return JSONResponse({"accepted": len(results), "results": results})


def routes(service: ServiceProvider) -> list[Route]:
    """``POST /feedback`` to the service ``service()`` returns."""

    async def endpoint(request: Request) -> JSONResponse:
        return await feedback(request, service())

    return [Route("/feedback", endpoint, methods=["POST"])]
