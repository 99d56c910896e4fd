"""The recorder thread: the only thread that touches the decision store, so answers never wait on it.

``record`` is called on the event loop after each answer: it puts the decisions on a bounded
queue and returns at once (a full queue, or a store that is down, drops them and counts them
"not recorded"; the answer is sent regardless). The thread drains the queue in batches (one
transaction for everything that queued up, which is what keeps the cost per answer small)
and runs the store calls the endpoints hand it (``call``: labels, live statistics), after
writing every decision queued before them — so a label posted after its answer was
recorded by this worker finds its decision.

The store is opened on the thread, lazily, and reopened after a failure (a database that
restarts comes back without restarting the service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from abstain.serving.store import Decision, DecisionStore, LabelConflictError, ReviewItem

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Most queued answers (batches of decisions) before new ones are dropped as not recorded.
MAX_QUEUED = 10_000
#: Most decisions written in one transaction.
MAX_WRITE = 5_000


class StoreUnavailableError(RuntimeError):
    """The store could not be opened or failed a call; the message says why."""


class Recorder:
    """Owns a :class:`DecisionStore` on a daemon thread; see the module docstring.

    Args:
        open_store: builds the store (called on the thread; again after a failure).
        on_dropped: called with the number of decisions not recorded (queue full, store down).
        on_tick: called on the thread with the open store every ``tick_s`` seconds (live gauges).
    """

    def __init__(
        self,
        open_store: Callable[[], DecisionStore],
        on_dropped: Callable[[int], None],
        on_tick: Callable[[DecisionStore], None] | None = None,
        tick_s: float = 5.0,
    ) -> None:
        self._open_store, self._on_dropped, self._on_tick, self._tick_s = (
            open_store,
            on_dropped,
            on_tick,
            tick_s,
        )
        self._queue: queue.Queue[Any] = queue.Queue(MAX_QUEUED)
        self._store: DecisionStore | None = None
        self._thread = threading.Thread(target=self._run, name="abstain-recorder", daemon=True)
        self._thread.start()

    def record(self, decisions: Sequence[Decision], reviews: Sequence[ReviewItem] = ()) -> None:
        """Queue ``decisions`` (and abstained inputs kept for review) for writing; never blocks."""
        try:
            self._queue.put_nowait([*decisions, *reviews])
        except queue.Full:
            self._on_dropped(len(decisions))

    async def call(self, fn: Callable[[DecisionStore], T]) -> T:
        """Run ``fn(store)`` on the recorder thread (after the decisions queued so far) and await it.

        Raises :class:`StoreUnavailableError` when the store cannot be opened, or ``fn``'s own error.
        """
        future: Future[T] = Future()
        try:
            self._queue.put_nowait(_Call(fn, future))
        except queue.Full:
            raise StoreUnavailableError(
                f"the decision store is {MAX_QUEUED} writes behind; retry later"
            ) from None
        return await asyncio.wrap_future(future)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread and close the store."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _store_or_open(self) -> DecisionStore:
        if self._store is None:
            try:
                self._store = self._open_store()
            except Exception as exc:
                raise StoreUnavailableError(f"the decision store cannot be opened: {exc}") from exc
        return self._store

    def _fail(self, exc: Exception) -> None:
        log.warning("decision store failed: %s", exc)
        if self._store is not None:
            with contextlib.suppress(Exception):  # it is being dropped anyway
                self._store.close()
            self._store = None

    def _write(self, pending: list[Decision | ReviewItem]) -> None:
        if not pending:
            return
        decisions = [d for d in pending if isinstance(d, Decision)]
        reviews = [r for r in pending if isinstance(r, ReviewItem)]
        try:
            self._store_or_open().record(decisions, reviews)
        except Exception as exc:  # a failing store costs the records, never the answers
            self._fail(exc)
            self._on_dropped(len(decisions))
        pending.clear()

    def _run(self) -> None:
        pending: list[Decision | ReviewItem] = []
        next_tick = time.monotonic() + self._tick_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = None
            while isinstance(item, list):  # gather what else queued up into the same transaction
                pending.extend(item)
                if len(pending) >= MAX_WRITE:
                    self._write(pending)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._write(pending)  # before a call or a stop: they see every earlier decision
            if item is _STOP:
                if self._store is not None:
                    self._store.close()
                return
            if isinstance(item, _Call):
                self._answer(item)
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


_STOP = object()
