"""Adaptive batching across requests, inside one worker's event loop.

Why not BentoML's ``@bentoml.api(batchable=True)``: BentoML batches only HTTP calls made to
the batchable endpoint itself (its dispatcher sits in the HTTP handler; a call from another
method of the same service is a plain Python call). Our endpoints take a variable number of
images plus an operating point and must validate, count and explain each request, so the
batchable method would have to be a second, public endpoint or a second service reached
over HTTP (one more hop and serialisation per request). Batching the *forward pass* here
keeps one process, one hop, and works identically for the ONNX Runtime and Triton backends.

Policy: requests queue; the batching task takes the first, then everything already queued,
then waits up to ``max_latency_ms`` for more while the batch holds fewer than
``max_batch_size`` images. The forward pass runs on one dedicated thread, so the event loop
keeps accepting requests meanwhile — what arrives during a pass forms the next batch (with
``max_latency_ms = 0`` this is pure "batch what queued up" batching, no added wait). With
``max_in_flight > 1`` (a remote backend) up to that many passes run at once, each on its own
thread; the next batch is formed as soon as a pass slot is free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from abstain.runtime import GraphOutputs
from abstain.serving.inference.backends import BackendUnavailableError

log = logging.getLogger(__name__)


class AdaptiveBatcher:
    """Coalesce concurrent ``submit(x)`` calls into forward passes of at most ``max_batch_size`` images.

    Args:
        infer: forward pass of a float32 ``[n, C, H, W]`` batch.
        max_batch_size: most images per forward pass (a bigger single request is split).
        max_latency_ms: longest wait for more requests once one is queued.
        on_batch: called with ``(images, seconds)`` after each forward pass (metrics).
        name: the backend's name; whatever ``infer`` raises reaches the caller as a
            :class:`BackendUnavailableError` naming it (a failure of the backend, not of the
            request nor of the service's code).
        max_in_flight: forward passes running at once, each on its own thread. 1 for ONNX
            Runtime in this process (it parallelises inside a pass); more for a remote backend
            (Triton), so that one slow call does not serialise the worker and Triton's own
            dynamic batcher sees several requests.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], GraphOutputs],
        max_batch_size: int = 64,
        max_latency_ms: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
        max_in_flight: int = 1,
        name: str = "inference",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size should be >= 1, but got {max_batch_size}")
        if max_latency_ms < 0:
            raise ValueError(f"max_latency_ms should be >= 0, but got {max_latency_ms}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight should be >= 1, but got {max_in_flight}")
        self._infer, self._on_batch, self.name = infer, on_batch, name
        self.max_in_flight = max_in_flight
        self.max_batch_size, self.max_latency_s = max_batch_size, max_latency_ms / 1000.0
        # one thread per pass in flight: backends need not be thread-safe (tritonclient.http is
        # not; TritonBackend keeps a client per thread), and ONNX Runtime already parallelises
        # inside a pass with its own intra-op threads
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="abstain-infer")
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[GraphOutputs]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, x: np.ndarray) -> GraphOutputs:
        """Outputs for ``x`` (float32 ``[n, C, H, W]``), computed in some shared forward pass."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._loop())
            self._task.add_done_callback(self._loop_ended)
        future: asyncio.Future[GraphOutputs] = loop.create_future()
        self._queue.put_nowait((x, future))
        return await future

    @staticmethod
    def _loop_ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "adaptive batching loop stopped; the next request starts a new one", exc_info=task.exception()
            )

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        in_flight: list[tuple[np.ndarray, asyncio.Future[GraphOutputs]]] = []
        try:
            await self._serve(queue, in_flight)
        finally:
            # whatever ends the loop (cancellation at shutdown, a BaseException from a backend,
            # a bug), no request may be left waiting for an answer that will never come: fail
            # the batch in flight and everything still queued; the next submit starts a new loop
            failure = RuntimeError("the batching loop stopped before this request was run")
            while not queue.empty():
                in_flight.append(queue.get_nowait())
            for _, future in in_flight:
                if not future.done():
                    future.set_exception(failure)

    async def _serve(
        self,
        queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[GraphOutputs]]],
        items: list[tuple[np.ndarray, asyncio.Future[GraphOutputs]]],
    ) -> None:
        """The batching loop; ``items`` is the caller's list of the requests taken off the queue."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_in_flight)
        running: set[asyncio.Task[None]] = set()
        while True:
            await slots.acquire()  # a free pass slot first: meanwhile requests keep queueing
            items.clear()
            try:
                items.append(await queue.get())
            except BaseException:
                slots.release()
                raise
            n = len(items[0][0])
            deadline = loop.time() + self.max_latency_s
            while n < self.max_batch_size:
                if queue.empty():
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        items.append(await asyncio.wait_for(queue.get(), timeout))
                    # asyncio.TimeoutError, not the builtin: they are one class only from Python
                    # 3.11 on, and on 3.10 (supported) the builtin would not catch wait_for's
                    except asyncio.TimeoutError:
                        break
                else:
                    items.append(queue.get_nowait())
                n += len(items[-1][0])
            items[:] = [(x, f) for x, f in items if not f.done()]  # drop requests already cancelled
            if not items:
                slots.release()
                continue
            task = loop.create_task(self._pass(list(items), slots))
            running.add(task)  # a strong reference until it ends (the loop keeps only weak ones)
            task.add_done_callback(running.discard)
            if self.max_in_flight == 1:
                await asyncio.shield(task)  # one pass at a time: its requests stay ours until it ends
            items.clear()

    async def _pass(
        self, items: list[tuple[np.ndarray, asyncio.Future[GraphOutputs]]], slots: asyncio.Semaphore
    ) -> None:
        """One forward pass of ``items`` on the inference threads; answers every future."""
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(
                self._executor, self._run_chunks, np.concatenate([x for x, _ in items])
            )
        except Exception as exc:  # a backend failure fails this batch's requests, not the loop
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled at shutdown, a fatal error: nobody may wait forever
            failure = RuntimeError("the batching loop stopped before this request was run")
            for _, future in items:
                if not future.done():
                    future.set_exception(failure)
            raise
        finally:
            slots.release()
        start = 0
        for x, future in items:
            stop = start + len(x)
            if not future.done():
                future.set_result(_rows(out, start, stop))
            start = stop

    def _run_chunks(self, x: np.ndarray) -> GraphOutputs:
        parts = []
        for i in range(0, len(x), self.max_batch_size):
            chunk = x[i : i + self.max_batch_size]
            t0 = time.perf_counter()
            try:
                parts.append(self._infer(chunk))
            except Exception as exc:
                raise BackendUnavailableError(self.name, exc) from exc
            if self._on_batch is not None:
                self._on_batch(len(chunk), time.perf_counter() - t0)
        return _concat(parts)


def _rows(out: GraphOutputs, start: int, stop: int) -> GraphOutputs:
    """Rows ``start:stop`` of every array of ``out``, keeping its type (a backend may return a
    subclass with more outputs, e.g. ``serving/triton/selective_backend.py``'s ``accept``)."""
    rows: dict[str, Any] = {
        f.name: None if getattr(out, f.name) is None else getattr(out, f.name)[start:stop]
        for f in dataclasses.fields(out)
    }
    return type(out)(**rows)


def _concat(parts: list[GraphOutputs]) -> GraphOutputs:
    """The batches of ``parts`` stacked, field by field, keeping their type."""
    first = parts[0]
    names = [f.name for f in dataclasses.fields(first)]
    stacked: dict[str, Any] = {
        n: None if getattr(first, n) is None else np.concatenate([getattr(p, n) for p in parts])
        for n in names
    }
    return type(first)(**stacked)
