"""Whether Triton may be used right now: a probe that runs at start-up, on a timer and after failures.

The calibrated thresholds are valid only for the exact graph they were fitted on. Triton can
go away (crash, rollout, network) and come back serving something else under the same name
and version, so "it verified at start-up" is not enough. :class:`TritonMonitor` keeps one of
three states, each with the answer a request gets while it holds:

==================  ============================================  =======  ================
state               meaning                                       /readyz  ``/predict``
==================  ============================================  =======  ================
``ready``           the last probe matched the calibrated graph   200      forwarded
``unavailable``     not reachable, model not ready, or a call     503      503 ``backend_unavailable``
                    failed since the last good probe
``graph_mismatch``  Triton answers with another graph             503      503 ``graph_mismatch``
==================  ============================================  =======  ================

The probe is :meth:`abstain.serving.inference.backends.TritonBackend.verify` (pinned version ready, then
a fixed batch through Triton and through the calibrated graph in local ONNX Runtime must
agree). It runs on its own thread (its own Triton client): every ``interval_s`` while
``ready``, every ``retry_s`` otherwise, and at once after :meth:`report_failure` — so a Triton
that comes back is verified *before* any request reaches it again (a restart under load
always fails some call first). Left open: a Triton swapped between two probes without any
failed call in between (an idle service) is caught by the next timed probe, up to
``interval_s`` later.
"""

from __future__ import annotations

import logging
import threading
import time

from abstain.runtime import OnnxModel
from abstain.serving.triton.backend import GraphMismatchError, TritonBackend

log = logging.getLogger("bentoml.abstain.triton")

READY, UNAVAILABLE, GRAPH_MISMATCH = "ready", "unavailable", "graph_mismatch"


class TritonMonitor:
    """Probe Triton in the background; :attr:`state` and :attr:`detail` say whether to use it.

    Args:
        backend: the service's Triton backend (its clients are per thread; the probe gets its own).
        reference: the calibrated graph in local ONNX Runtime.
        interval_s: seconds between probes while ready.
        retry_s: seconds between probes while not ready.
    """

    def __init__(
        self, backend: TritonBackend, reference: OnnxModel, interval_s: float = 5.0, retry_s: float = 0.5
    ) -> None:
        if not (interval_s > 0 and retry_s > 0):
            raise ValueError(f"interval_s and retry_s should be > 0, but got {interval_s!r}, {retry_s!r}")
        self.backend, self.reference = backend, reference
        self.interval_s, self.retry_s = interval_s, retry_s
        self.state, self.detail = UNAVAILABLE, "not probed yet"
        self.probes = 0
        self._failures = 0  # failed calls reported; a probe started before one cannot clear it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    def probe(self) -> str:
        """Run the probe once (blocking, at most a few Triton timeouts) and return the new state."""
        failures = self._failures
        try:
            self.backend.verify(self.reference)
        except GraphMismatchError as exc:
            self._set(GRAPH_MISMATCH, str(exc))
        except Exception as exc:  # unreachable, not ready, timed out: all "try again later"
            self._set(UNAVAILABLE, str(exc))
        else:
            if failures == self._failures:  # else a call failed meanwhile: the next probe decides
                self._set(READY, "the probe batch matched the calibrated graph")
        self.probes += 1
        return self.state

    def report_failure(self, exc: BaseException) -> None:
        """A request's Triton call failed: stop forwarding and probe again now (thread-safe)."""
        self._failures += 1
        if self.state == READY:
            self._set(UNAVAILABLE, f"a Triton call failed ({type(exc).__name__}: {exc})")
        self._wake.set()

    def start(self) -> None:
        """Probe on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="abstain-triton-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self.ready else self.retry_s)
            self._wake.clear()
            if not self._stop.is_set():
                started = time.monotonic()
                self.probe()
                log.debug("Triton probe: %s in %.3f s", self.state, time.monotonic() - started)

    def _set(self, state: str, detail: str) -> None:
        if state != self.state:
            # INFO of the bentoml logger tree reaches BentoML's server log (see service.startup_log)
            log.info("Triton backend %s -> %s: %s", self.state, state, detail[:300])
        self.state, self.detail = state, detail
