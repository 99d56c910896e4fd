"""The adaptive batcher's loop survives timeouts and failing forward passes (serving/inference/batcher.py).

The forward pass here is a small numpy function standing in for a graph: the batcher only
needs a callable from ``[n, C, H, W]`` to :class:`GraphOutputs`.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from abstain.runtime import GraphOutputs
from abstain.serving.inference.batcher import AdaptiveBatcher


class Forward:
    """``logits[i] = [sum(x_i), 0]``, ``selection[i] = mean(x_i)``; fails on batches holding a NaN."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: np.ndarray) -> GraphOutputs:
        if np.isnan(x).any():
            raise RuntimeError("backend failed on this batch")
        self.batches.append(len(x))
        flat = x.reshape(len(x), -1)
        return GraphOutputs(
            logits=np.stack([flat.sum(axis=1), np.zeros(len(x), np.float32)], axis=1),
            selection=flat.mean(axis=1),
        )


def images(*values: float) -> np.ndarray:
    return np.stack([np.full((1, 2, 2), v, np.float32) for v in values])


def test_loop_survives_the_batching_timeout_and_a_failing_forward_pass() -> None:
    forward = Forward()
    batcher = AdaptiveBatcher(forward, max_batch_size=8, max_latency_ms=20)

    async def scenario() -> None:
        # alone in the queue: the batcher waits 20 ms for more, times out, and runs it
        out = await batcher.submit(images(0.25))
        assert out.selection.tolist() == [0.25]
        # a failing pass fails every request of its batch, with the backend's exception...
        bad, good = images(np.nan), images(0.5, 0.75)
        results = await asyncio.gather(batcher.submit(bad), batcher.submit(good), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "backend failed" in str(r) for r in results)
        # ...and the loop goes on: later requests are still served, by the same task
        task = batcher._task
        first, second = await asyncio.gather(batcher.submit(images(0.5)), batcher.submit(images(1.0, 0.0)))
        assert first.selection.tolist() == [0.5] and second.selection.tolist() == [1.0, 0.0]
        assert second.logits[:, 0].tolist() == [4.0, 0.0]
        assert batcher._task is task and not task.done()
        task.cancel()

    asyncio.run(scenario())


def test_timeout_is_caught_with_python_3_10_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    # on Python 3.10 asyncio.wait_for raises asyncio.TimeoutError, a class of its own that the
    # builtin TimeoutError does not catch; reproduce that split on the running interpreter
    class Py310TimeoutError(Exception):
        pass

    wait_for = asyncio.wait_for

    async def wait_for_310(awaitable, timeout):  # type: ignore[no-untyped-def]
        try:
            return await wait_for(awaitable, timeout)
        except TimeoutError:
            raise Py310TimeoutError from None

    monkeypatch.setattr(asyncio, "TimeoutError", Py310TimeoutError)
    monkeypatch.setattr(asyncio, "wait_for", wait_for_310)
    batcher = AdaptiveBatcher(Forward(), max_batch_size=8, max_latency_ms=5)

    async def scenario() -> None:
        for value in (0.25, 0.5):  # the second request proves the loop outlived the first timeout
            out = await asyncio.wait_for(batcher.submit(images(value)), 5)
            assert out.selection.tolist() == [value]
        assert batcher._task is not None and not batcher._task.done()
        batcher._task.cancel()

    asyncio.run(scenario())


class Fatal(BaseException):
    """Not an ``Exception``: the per-batch handler does not catch it, so it ends the loop."""


def test_requests_fail_instead_of_hanging_when_the_loop_dies() -> None:
    # the request in flight and the ones still queued must get an exception, not wait forever
    release = threading.Event()

    def forward(x: np.ndarray) -> GraphOutputs:
        release.wait(5)
        raise Fatal

    batcher = AdaptiveBatcher(forward, max_batch_size=1)

    async def scenario() -> None:
        pending = [asyncio.ensure_future(batcher.submit(images(v))) for v in (0.1, 0.2, 0.3)]
        await asyncio.sleep(0.05)  # the first is in flight, the others queued
        release.set()
        _, not_done = await asyncio.wait(pending, timeout=5)
        assert not not_done, "requests hung after the batching loop died"
        assert all(isinstance(f.exception(), RuntimeError) for f in pending)
        assert "batching loop stopped" in str(pending[0].exception())
        # the next request starts a fresh loop and is served
        ok = Forward()
        batcher._infer = ok
        out = await asyncio.wait_for(batcher.submit(images(0.4)), 5)
        assert out.selection.tolist() == [pytest.approx(0.4)]
        batcher._task.cancel()

    asyncio.run(scenario())


def test_cancelled_loop_fails_its_requests() -> None:
    # e.g. the worker's event loop shutting down while requests wait in the queue
    release = threading.Event()

    def forward(x: np.ndarray) -> GraphOutputs:
        release.wait(5)
        return Forward()(x)

    batcher = AdaptiveBatcher(forward, max_batch_size=1)

    async def scenario() -> None:
        pending = [asyncio.ensure_future(batcher.submit(images(v))) for v in (0.1, 0.2)]
        await asyncio.sleep(0.05)
        batcher._task.cancel()
        await asyncio.sleep(0.05)
        release.set()
        _, not_done = await asyncio.wait(pending, timeout=5)
        assert not not_done, "requests hung after the batching loop was cancelled"
        assert all(isinstance(f.exception(), RuntimeError) for f in pending)

    asyncio.run(scenario())


@pytest.mark.parametrize(("in_flight", "overlap"), [(1, 1), (3, 3)])
def test_passes_in_flight_overlap_up_to_the_limit(in_flight: int, overlap: int) -> None:
    # a remote backend: each pass waits 0.2 s on the "network"; with 3 in flight, 3 requests
    # sent together (batch size 1) run at once; with 1, one after the other
    running, most = 0, 0
    lock = threading.Lock()

    def forward(x: np.ndarray) -> GraphOutputs:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.2)
        with lock:
            running -= 1
        return Forward()(x)

    batcher = AdaptiveBatcher(forward, max_batch_size=1, max_in_flight=in_flight)

    async def scenario() -> list[float]:
        outs = await asyncio.gather(*(batcher.submit(images(v)) for v in (0.1, 0.2, 0.3)))
        batcher._task.cancel()
        return [float(o.selection[0]) for o in outs]

    assert asyncio.run(scenario()) == pytest.approx([0.1, 0.2, 0.3])  # each request its own answer
    assert most == overlap
