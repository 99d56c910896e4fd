"""The request path in-process: the service's own middlewares and routes around a real service
instance (the embedded digits graph in ONNX Runtime), driven by ``httpx.ASGITransport``.

The middlewares reach the service only through the typed contract
(:class:`abstain.serving.http.contract.ServiceContract`), so no server process is needed to
check the one error path: a rejected input is a 4xx counted once by reason, a failed backend a
503 counted as a backend error, and a bug in our own code a 500 counted as an internal error —
never a 503 that blames the backend.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from abstain.decisions import decide_arrays
from abstain.serving.http import client_errors
from abstain.serving.http.middleware import (
    CheckUploadForms,
    CountFrameworkRejections,
    JsonPredict,
    LimitPredictBody,
    NpyPredict,
)
from abstain.serving.http.routes import routes
from abstain.serving.http.v2_routes import V2Infer
from tests.digits import load_digits


async def _framework(_: Request) -> JSONResponse:
    """Stands where BentoML's own ``/predict`` endpoint is: what the middlewares pass on."""
    return JSONResponse({"error": "the framework's answer"}, status_code=400)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real :class:`abstain.serving.service.Abstain` instance for the embedded digits model."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ABSTAIN_STORE", "off")
    mp.setenv("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml-home")))
    mp.setenv("ABSTAIN_ORT_THREADS", "1")
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    from abstain.serving import service as service_module
    from abstain.serving.config.settings import ServeSettings

    # the module reads its settings once, at import: read them again from this environment, in
    # case another test of this process imported it first
    mp.setattr(service_module, "SETTINGS", ServeSettings.from_env())
    instance = service_module.Abstain.inner()
    assert instance.decision_log is None  # the store is off, as set above
    yield instance
    # out of the default registry again, so that other tests of this process can make theirs
    seen = {id(v): v for v in vars(instance.metrics).values() if isinstance(v, MetricWrapperBase)}
    for collector in seen.values():
        REGISTRY.unregister(collector)
    mp.undo()


def app_for(service: Any) -> Starlette:
    """The service's middleware stack, outermost first as ``service.py`` adds them."""
    provider = lambda: service  # noqa: E731
    inner = Starlette(routes=[Route("/predict", _framework, methods=["POST"]), *routes(provider)])
    app: Any = inner
    for middleware in (
        V2Infer,
        JsonPredict,
        NpyPredict,
        LimitPredictBody,
        CheckUploadForms,
        CountFrameworkRejections,
    ):
        app = middleware(app, service=provider)
    return app


def post(service: Any, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app_for(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            return await client.post(path, **kwargs)

    return asyncio.run(go())


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def rejected(service: Any, reason: str) -> float:
    return counter(service.metrics.rejected, "digits", "1", reason)


def test_a_json_request_is_decided_as_decide_arrays_decides(service: Any) -> None:
    test = load_digits("test")
    x = test.x[:5]
    reply = post(
        service, "/predict", json={"pixels": x.tolist(), "request_id": [f"id-{i}" for i in range(5)]}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    point = service.artifacts.calibration.operating_point(None)
    out = service.model.run(x)
    want = decide_arrays(out.logits, out.selection, point, out.selection_logit)
    assert [a["request_id"] for a in body["predictions"]] == [f"id-{i}" for i in range(5)]
    assert [a["decision"] == "predict" for a in body["predictions"]] == want.answered.tolist()
    assert [a["score_value"] for a in body["predictions"]] == pytest.approx(want.score_value.tolist())
    assert body["operating_point"] == point.name


@pytest.mark.parametrize(
    ("kwargs", "status", "reason"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
        ({"json": {"pixels": [[[2.0]]]}}, 400, "bad_shape"),
        ({"json": {"pixels": np.zeros((1, 8, 8)).tolist(), "operating_point": "nope"}}, 400,
         "unknown_operating_point"),
        ({"json": {"pixels": np.zeros((1, 8, 8)).tolist(), "request_id": ["a", "b"]}}, 400, "bad_request_id"),
        ({"content": b"\x93NUMPY lies", "headers": {"content-type": "application/x-npy"}}, 400, "bad_npy"),
    ],
)  # fmt: skip
def test_a_rejected_input_is_a_4xx_counted_once_by_its_reason(
    service: Any, kwargs: dict[str, Any], status: int, reason: str
) -> None:
    before = rejected(service, reason)
    reply = post(service, "/predict", **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["reason"] == reason
    assert rejected(service, reason) == before + 1


def test_a_body_past_the_limit_is_a_413_counted_once(service: Any) -> None:
    before = rejected(service, "batch_too_large")
    limit = service.max_body_bytes(npy=True)
    reply = post(
        service, "/predict", content=b"\0" * (limit + 1), headers={"content-type": "application/x-npy"}
    )
    assert reply.status_code == 413
    assert rejected(service, "batch_too_large") == before + 1


def test_an_answer_of_the_framework_is_counted_as_a_rejection(service: Any) -> None:
    # a text/plain body is left to BentoML (here: the stand-in endpoint's 400), and counted there
    before = rejected(service, "bad_json")
    reply = post(service, "/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert reply.json() == {"error": "the framework's answer"}
    assert rejected(service, "bad_json") == before + 1


def test_a_failing_backend_is_a_503_counted_as_a_backend_error(
    service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_: np.ndarray) -> Any:
        raise RuntimeError("the session is gone")

    monkeypatch.setattr(service.batcher, "_infer", broken)
    before = counter(service.metrics.backend_errors, "digits", "1", "onnxruntime")
    internal = counter(service.metrics.internal_errors, "digits", "1")
    reply = post(service, "/predict", json={"pixels": np.zeros((1, 8, 8)).tolist()})
    assert reply.status_code == 503
    assert reply.json()["reason"] == "backend_unavailable"
    assert "the session is gone" in reply.json()["error"]
    assert counter(service.metrics.backend_errors, "digits", "1", "onnxruntime") == before + 1
    assert counter(service.metrics.internal_errors, "digits", "1") == internal


def test_a_bug_in_our_code_is_a_500_logged_and_counted_not_a_backend_error(
    service: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def bug(*_: Any) -> Any:
        raise KeyError("a bug in building the answers")

    monkeypatch.setattr(service, "_answers", bug)
    backend = counter(service.metrics.backend_errors, "digits", "1", "onnxruntime")
    before = counter(service.metrics.internal_errors, "digits", "1")
    with caplog.at_level(logging.ERROR, logger="bentoml.abstain"):
        reply = post(service, "/predict", json={"pixels": np.zeros((1, 8, 8)).tolist()})
    assert reply.status_code == 500
    assert reply.json()["reason"] == "internal_error"
    assert counter(service.metrics.internal_errors, "digits", "1") == before + 1
    assert counter(service.metrics.backend_errors, "digits", "1", "onnxruntime") == backend
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)


def test_npy_and_json_bodies_get_the_same_decisions(service: Any) -> None:
    x = load_digits("test").x[:8]
    buffer = io.BytesIO()
    np.save(buffer, x)
    npy = post(service, "/predict", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
    as_json = post(service, "/predict", json={"pixels": x.tolist()})
    assert npy.status_code == as_json.status_code == 200
    strip = [{k: v for k, v in a.items() if k != "request_id"} for a in npy.json()["predictions"]]
    assert strip == [{k: v for k, v in a.items() if k != "request_id"} for a in as_json.json()["predictions"]]


def test_metadata_and_feedback_routes_use_the_given_service(service: Any) -> None:
    async def go() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app_for(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            return await client.get("/metadata"), await client.post("/feedback", content=b"[]")

    metadata, feedback = asyncio.run(go())
    assert metadata.json()["model"] == "digits" and metadata.json()["classes"] == list(service.class_names)
    # the store is off in this instance: feedback says so, as a 503 naming the setting
    assert feedback.status_code == 503 and "ABSTAIN_STORE=off" in json.loads(feedback.text)["error"]


def _record(exc: BaseException) -> logging.LogRecord:
    return logging.LogRecord(
        client_errors.BENTOML_HTTP_LOGGER, logging.ERROR, __file__, 1, "Exception on %s [%s]",
        ("/predict", "POST"), (type(exc), exc, None),
    )  # fmt: skip


def test_client_errors_of_bentoml_are_logged_as_client_errors_without_a_traceback() -> None:
    from bentoml.exceptions import BadInput, InternalServerError

    record = _record(BadInput("Invalid JSON input received"))
    assert client_errors.ClientErrorFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == "client error on /predict: 400 Invalid JSON input received"
    # a server-side failure stays an ERROR with its traceback
    for exc in (InternalServerError("boom"), RuntimeError("boom")):
        kept = _record(exc)
        assert client_errors.ClientErrorFilter().filter(kept)
        assert kept.levelno == logging.ERROR and kept.exc_info is not None
