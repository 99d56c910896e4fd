"""The recorder thread: the only thread that touches the decision store, so answers never wait on it.

``record`` is called on the event loop after each answer: it appends the decisions to an
in-memory buffer and returns at once — no lock handed over, no thread woken (a full buffer,
or a store that is down, drops them and counts them "not recorded"; the answer is sent
regardless). The thread wakes every :data:`FLUSH_S` seconds and writes everything buffered
in one transaction. Why not wake it per answer: a thread woken for every answer competes
with the event loop for the GIL and the cores, and single-row transactions cost several times
more per row than bursts (docs/benchmarks.md, "Decision store").

Store calls from the endpoints (``call``: labels, review pages) wake the thread at once, and
run after every decision buffered before them is written — so a label posted after its
answer was recorded by this worker finds its decision. The store is opened on the thread,
lazily, and reopened after a failure (a database that restarts comes back without
restarting the service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from abstain.serving.store.decision_store import Decision, DecisionStore, LabelConflictError, ReviewItem

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Most buffered rows (decisions and review items) before new ones are dropped as not recorded.
MAX_BUFFERED = 100_000
#: Most rows written in one transaction.
MAX_WRITE = 5_000
#: Seconds between writes: how stale the store may be (a label waits for at most one).
FLUSH_S = 0.1


class StoreUnavailableError(RuntimeError):
    """The store could not be opened or failed a call; the message says why."""


class Recorder:
    """Owns a :class:`DecisionStore` on a daemon thread; see the module docstring.

    Args:
        open_store: builds the store (called on the thread; again after a failure).
        on_dropped: called with the number of decisions not recorded (buffer full, store down).
        on_tick: called on the thread with the open store every ``tick_s`` seconds (live gauges).
    """

    def __init__(
        self,
        open_store: Callable[[], DecisionStore],
        on_dropped: Callable[[int], None],
        on_tick: Callable[[DecisionStore], None] | None = None,
        tick_s: float = 5.0,
    ) -> None:
        self._open_store, self._on_dropped = open_store, on_dropped
        self._on_tick, self._tick_s = on_tick, tick_s
        self._buffer: deque[Decision | ReviewItem] = deque()  # append/popleft are thread-safe
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False
        self._store: DecisionStore | None = None
        self._thread = threading.Thread(target=self._run, name="abstain-recorder", daemon=True)
        self._thread.start()

    def record(self, decisions: Sequence[Decision], reviews: Sequence[ReviewItem] = ()) -> None:
        """Buffer ``decisions`` (and abstained inputs kept for review) for writing; never blocks."""
        if len(self._buffer) >= MAX_BUFFERED:
            self._on_dropped(len(decisions))
            return
        self._buffer.extend(decisions)
        self._buffer.extend(reviews)

    async def call(self, fn: Callable[[DecisionStore], T]) -> T:
        """Run ``fn(store)`` on the recorder thread (after the decisions buffered so far) and await it.

        Raises :class:`StoreUnavailableError` when the store cannot be opened, or ``fn``'s own error.
        """
        future: Future[T] = Future()
        self._calls.put(_Call(fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered, then stop the thread and close the store."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _store_or_open(self) -> DecisionStore:
        if self._store is None:
            try:
                self._store = self._open_store()
            except Exception as exc:
                raise StoreUnavailableError(f"the decision store cannot be opened: {exc}") from exc
            if self._failing:
                log.warning("decision store is back; decisions are recorded again")
                self._failing = False
        return self._store

    def _fail(self, exc: Exception) -> None:
        if not self._failing:  # once per outage, not once per flush (10 a second)
            log.warning("decision store failed (%s); decisions are not recorded until it is back", exc)
            self._failing = True
        if self._store is not None:
            with contextlib.suppress(Exception):  # it is being dropped anyway
                self._store.close()
            self._store = None

    def _flush(self) -> None:
        """Write everything buffered now, :data:`MAX_WRITE` rows per transaction."""
        while self._buffer:
            rows = [self._buffer.popleft() for _ in range(min(len(self._buffer), MAX_WRITE))]
            decisions = [r for r in rows if isinstance(r, Decision)]
            reviews = [r for r in rows if isinstance(r, ReviewItem)]
            try:
                self._store_or_open().record(decisions, reviews)
            except Exception as exc:  # a failing store costs the records, never the answers
                self._fail(exc)
                self._on_dropped(len(decisions))

    def _run(self) -> None:
        next_tick = time.monotonic()  # the first tick at once: the live gauges exist from the start
        while True:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            calls = []  # taken before the flush: their decisions were buffered before them
            while True:
                try:
                    calls.append(self._calls.get_nowait())
                except queue.Empty:
                    break
            self._flush()
            for call in calls:
                self._answer(call)
            if self._stopping:
                if self._store is not None:
                    self._store.close()
                return
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_s
                if self._on_tick is not None:
                    try:
                        self._on_tick(self._store_or_open())
                    except Exception as exc:  # the next tick tries again
                        self._fail(exc)

    def _answer(self, call: _Call) -> None:
        try:
            call.future.set_result(call.fn(self._store_or_open()))
        except (StoreUnavailableError, LabelConflictError) as exc:  # answers, not store failures
            call.future.set_exception(exc)
        except Exception as exc:  # the endpoint answers 503 with it
            self._fail(exc)
            call.future.set_exception(StoreUnavailableError(f"the decision store failed: {exc}"))


@dataclass(frozen=True)
class _Call:
    fn: Callable[[DecisionStore], Any]
    future: Future[Any]
