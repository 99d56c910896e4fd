"""The request timeout does not keep finished requests alive (no growing GC stall).

BentoML 1.4's ``TimeoutMiddleware`` never cancels its per-request timer, so each finished
request stays reachable for the whole ``ABSTAIN_TIMEOUT`` (~12 objects per request kept).
Against the real ``bentoml serve`` (with the test probe of ``probe_service``), live objects
are counted after a warm-up and again after some thousands of requests: with the leak they
would grow by ~12 × 3000 = 36,000; without it, by a few hundred at most (caches, histograms).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from abstain.serving.http.middleware import RequestTimeout
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR

pytestmark = pytest.mark.server

REQUESTS = 3000


def live_objects(url: str) -> int:
    return httpx.get(f"{url}/debug/live-objects", timeout=30).json()["live_objects"]


def test_live_objects_do_not_grow_with_the_request_count(start_server) -> None:
    server = start_server(
        target="tests.serving.probe_service:Abstain", model_dir=MODEL_DIR, workers=1, timeout=60
    )
    body = {"pixels": load_digits("test").x[:1].tolist()}

    def post_many(n: int) -> list[int]:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return [client.post("/predict", json=body).status_code for _ in range(n)]

    def load(n: int) -> None:
        with ThreadPoolExecutor(4) as pool:
            statuses = [s for part in pool.map(post_many, [n // 4] * 4) for s in part]
        assert statuses == [200] * n

    load(400)  # warm-up: lazily built caches, metric series, connection objects
    before = live_objects(server.url)
    load(REQUESTS)
    grown = live_objects(server.url) - before
    # all 3000 requests ended well within the 60 s timeout: with timers left armed, ~36,000 more
    assert grown < 2000, f"{grown} more live objects after {REQUESTS} requests"


def test_request_timeout_answers_504_and_leaves_no_timer() -> None:
    async def slow_app(scope, receive, send) -> None:
        await asyncio.sleep(10)

    async def quick_app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(app) -> tuple[list[dict], int]:
        sent: list[dict] = []

        async def send(message) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        await RequestTimeout(app, timeout=0.2)({"type": "http", "path": "/"}, receive, send)
        await asyncio.sleep(0)  # let the cancelled app task unwind (its own sleep's timer)
        # timers still armed on the loop: BentoML's middleware leaves one per request here
        armed = [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]
        return sent, len(armed)

    sent, armed = asyncio.run(run(slow_app))
    assert sent[0]["status"] == 504 and armed == 0
    sent, armed = asyncio.run(run(quick_app))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok" and armed == 0
