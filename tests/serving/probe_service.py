"""The service plus test-only probes: ``bentoml serve tests.serving.probe_service:Abstain``.

The shipped service has no debug endpoint; these exist only here, in a worker of this module:

* ``GET /debug/live-objects`` runs a full garbage collection and answers the number of objects
  the collector tracks in this worker (``len(gc.get_objects())``), for
  tests/serving/test_request_timeout.py.
* Where the work of a request runs, for tests/serving/test_event_loop.py. The steps of a
  request that cost time — :data:`STEPS`: the JSON decode, the pixel conversion of a JSON or
  ``.npy`` body, the forward pass, the decisions — are wrapped (wherever the serving modules
  bound them by name) so that each call records an event: its step, its size (bytes of a
  body, images of a batch), the thread it ran on, whether that is the event loop's thread,
  and when it started and ended (``time.perf_counter`` of this worker).

  - ``GET /debug/events`` answers them; ``DELETE /debug/events`` forgets them.
  - ``POST /debug/hold?step=S&min_size=N&limit_s=L`` arms a hold: the next call of step ``S``
    of at least size ``N`` waits, on its own thread, until ``POST /debug/release`` (at most
    ``L`` seconds, :data:`HOLD_LIMIT_S` by default). A call on the event loop's thread is never
    held (it would stop the loop, and the test with it): it runs and records ``on_loop: true``,
    which the test reads.
    ``GET /debug/hold`` says whether the held call is waiting (``holding``), and whether this
    answer itself ran on the loop's thread (``on_loop``: the detector checked on a known case).
  - ``POST /debug/control`` runs an instrumented no-op once on the loop and once on a thread:
    both events must tell the two apart, or the detector would prove nothing.
  - ``POST /debug/block?s=X`` blocks the loop for ``X`` seconds: what the ticker must see.
  - ``POST /debug/ticker/start`` starts a task on the loop that wakes every :data:`TICK_S`
    and notes when it woke; ``POST /debug/ticker/stop`` stops it and answers the wake times:
    while the loop is held (a blocking call, the GIL held by another thread), no wake happens.
  - requests sent with an ``x-probe-tag`` header are noted with their tag, status, start and
    end (``GET /debug/requests``; ``DELETE`` forgets them), so that a test can tell which of
    the events and wakes fell inside one request, on the worker's own clock.

The loop's thread is the one that runs this module's ASGI middleware, the outermost of the
service's own (every request passes it before the service's middlewares answer).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import abstain.decisions
import abstain.serving.http.middleware
import abstain.serving.http.validation
from abstain.serving.inference.backends import OnnxRuntimeBackend
from abstain.serving.service import Abstain, metadata_app

#: Longest a held call waits for ``POST /debug/release`` unless ``limit_s`` says (a test that
#: failed never releases).
HOLD_LIMIT_S = 60.0
#: How often the ticker task wakes on the loop.
TICK_S = 0.001

EVENTS: deque[dict[str, Any]] = deque(maxlen=20_000)
REQUESTS: deque[dict[str, Any]] = deque(maxlen=20_000)
TICKS: list[float] = []
_ticker: asyncio.Task[None] | None = None
_loop_thread: int | None = None  # threading.get_ident() of the thread running the event loop
_lock = threading.Lock()


def on_loop() -> bool:
    """Whether the caller runs on the event loop's thread (where a blocking call stops the loop)."""
    return _loop_thread is not None and threading.get_ident() == _loop_thread


class Hold:
    def __init__(self, step: str, min_size: int, limit_s: float) -> None:
        self.step, self.min_size, self.limit_s = step, min_size, limit_s
        self.taken = False  # a call took it (and was held, unless it ran on the loop)
        self.refused_on_loop = False
        self.holding, self.release = threading.Event(), threading.Event()


_hold: Hold | None = None


def _take_hold(step: str, size: int) -> Hold | None:
    with _lock:
        hold = _hold
        if hold is None or hold.taken or hold.step != step or size < hold.min_size:
            return None
        hold.taken = True
        return hold


def instrument(step: str, fn: Callable[..., Any], size: Callable[..., int]) -> Callable[..., Any]:
    """``fn`` recording an event per call (see the module docstring); ``size(*args)``: its size."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            n = int(size(*args, **kwargs))
        except Exception:  # not this wrapper's business to fail a request
            n = -1
        thread = threading.current_thread()
        event: dict[str, Any] = {
            "step": step,
            "size": n,
            "thread": thread.name,
            "on_loop": on_loop(),
            "held": False,
            "start": time.perf_counter(),
        }
        hold = _take_hold(step, n)
        if hold is not None:
            if event["on_loop"]:
                hold.refused_on_loop = True  # never stop the loop: the event says where it ran
            else:
                hold.holding.set()
                event["held"] = hold.release.wait(hold.limit_s)
        try:
            return fn(*args, **kwargs)
        finally:
            event["end"] = time.perf_counter()
            EVENTS.append(event)

    wrapper.__probe_original__ = fn  # type: ignore[attr-defined]
    return wrapper


def instrument_everywhere(step: str, fn: Callable[..., Any], size: Callable[..., int]) -> None:
    """Replace ``fn`` by its instrumented wrapper in every ``abstain`` module that binds it (the
    serving modules import these functions by name); refuse to start if none does."""
    wrapper = instrument(step, fn, size)
    bound = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "abstain" or name.startswith("abstain.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is fn:
                setattr(module, attr, wrapper)
                bound += 1
    if not bound:
        raise RuntimeError(f"probe_service: no abstain module binds {fn.__module__}.{fn.__qualname__}")


def _batch_length(raw: Any, *_: Any, **__: Any) -> int:
    return len(raw)


#: The instrumented steps and the unit of their size.
STEPS = {
    "loads_json": "bytes of the JSON body",
    "parse_pixels": "images of the JSON batch",
    "parse_npy": "bytes of the .npy body",
    "infer": "images of the forward pass",
    "decide": "images decided",
}
instrument_everywhere("loads_json", abstain.serving.http.middleware.loads_json, _batch_length)
instrument_everywhere("parse_pixels", abstain.serving.http.validation.parse_pixels, _batch_length)
instrument_everywhere("parse_npy", abstain.serving.http.validation.parse_npy, _batch_length)
instrument_everywhere("decide", abstain.decisions.decide_arrays, _batch_length)
# the backend's method is looked up when the service builds its batcher, after this import
OnnxRuntimeBackend.infer = instrument("infer", OnnxRuntimeBackend.infer, lambda _self, x, *a, **k: len(x))


def _noop(_: Any) -> None:
    return None


_control = instrument("control", _noop, lambda tag: 0)


class RecordRequests:
    """ASGI middleware: note the loop's thread, and the requests that carry ``x-probe-tag``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        global _loop_thread
        _loop_thread = threading.get_ident()
        tag = Headers(scope=scope).get("x-probe-tag") if scope["type"] == "http" else None
        if tag is None:
            return await self.app(scope, receive, send)
        record: dict[str, Any] = {"tag": tag, "status": None, "start": time.perf_counter()}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            record["end"] = time.perf_counter()
            REQUESTS.append(record)


async def _live_objects(_: Request) -> JSONResponse:
    gc.collect()
    return JSONResponse({"live_objects": len(gc.get_objects())})


async def _events(request: Request) -> JSONResponse:
    if request.method == "DELETE":
        EVENTS.clear()
    return JSONResponse(list(EVENTS))


async def _requests(request: Request) -> JSONResponse:
    if request.method == "DELETE":
        REQUESTS.clear()
    return JSONResponse(list(REQUESTS))


async def _hold_endpoint(request: Request) -> JSONResponse:
    global _hold
    if request.method == "POST":
        step = request.query_params["step"]
        if step not in STEPS:
            return JSONResponse({"error": f"unknown step {step!r}; valid: {sorted(STEPS)}"}, status_code=400)
        with _lock:
            if _hold is not None:
                _hold.release.set()
            _hold = Hold(
                step,
                int(request.query_params.get("min_size", "0")),
                float(request.query_params.get("limit_s", HOLD_LIMIT_S)),
            )
    hold = _hold
    return JSONResponse(
        {
            "on_loop": on_loop(),
            "step": None if hold is None else hold.step,
            "taken": hold is not None and hold.taken,
            "holding": hold is not None and hold.holding.is_set(),
            "refused_on_loop": hold is not None and hold.refused_on_loop,
        }
    )


async def _release(_: Request) -> JSONResponse:
    global _hold
    with _lock:
        hold, _hold = _hold, None
    if hold is not None:
        hold.release.set()
    return JSONResponse({"released": hold is not None and hold.holding.is_set()})


async def _control_endpoint(_: Request) -> JSONResponse:
    EVENTS.clear()
    _control("loop")
    await asyncio.get_running_loop().run_in_executor(None, _control, "thread")
    return JSONResponse(list(EVENTS))


async def _block(request: Request) -> JSONResponse:
    """Block the loop for ``s`` seconds (``time.sleep`` on its thread): the ticker's own check."""
    seconds = float(request.query_params["s"])
    time.sleep(seconds)
    return JSONResponse({"blocked_s": seconds})


async def _tick() -> None:
    while True:
        await asyncio.sleep(TICK_S)
        TICKS.append(time.perf_counter())


async def _ticker_start(_: Request) -> JSONResponse:
    global _ticker
    if _ticker is not None:
        _ticker.cancel()
    TICKS.clear()
    TICKS.append(time.perf_counter())
    _ticker = asyncio.get_running_loop().create_task(_tick())
    return JSONResponse({"tick_s": TICK_S, "switch_interval_s": sys.getswitchinterval()})


async def _ticker_stop(_: Request) -> JSONResponse:
    global _ticker
    if _ticker is not None:
        _ticker.cancel()
        _ticker = None
    TICKS.append(time.perf_counter())
    return JSONResponse({"ticks": list(TICKS), "switch_interval_s": sys.getswitchinterval()})


metadata_app.router.routes.extend(
    [
        Route("/debug/live-objects", _live_objects, methods=["GET"]),
        Route("/debug/events", _events, methods=["GET", "DELETE"]),
        Route("/debug/requests", _requests, methods=["GET", "DELETE"]),
        Route("/debug/hold", _hold_endpoint, methods=["GET", "POST"]),
        Route("/debug/release", _release, methods=["POST"]),
        Route("/debug/control", _control_endpoint, methods=["POST"]),
        Route("/debug/block", _block, methods=["POST"]),
        Route("/debug/ticker/start", _ticker_start, methods=["POST"]),
        Route("/debug/ticker/stop", _ticker_stop, methods=["POST"]),
    ]
)
# outermost of the service's middlewares (Starlette: the first listed wraps the others), so
# that it sees every request, also those JsonPredict and NpyPredict answer without going further
Abstain.middlewares.insert(0, (RecordRequests, {}))

__all__ = ["Abstain"]
