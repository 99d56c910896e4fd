"""The remote backend: the graph's forward pass in Triton Inference Server (tritonclient).

Like :class:`abstain.serving.inference.backends.OnnxRuntimeBackend` it takes a validated
float32 batch ``[N, C, H, W]`` and returns :class:`abstain.runtime.GraphOutputs`.

The remote backend must never apply a calibration to a graph other than the one it was
fitted on. Triton does not expose a graph's hash, so :class:`TritonBackend` (1) pins the
model *version* (the version directory of the calibrated graph; Triton's "latest" could move
under us) and (2) at start-up runs a fixed probe batch through Triton and through the
calibrated graph in local ONNX Runtime, refusing to start unless the outputs agree
(``atol=1e-4``). A different graph — retrained, re-exported, another model under the same
name — gives different outputs on the probe and is refused with a message naming both.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from abstain.contract import INPUT_NAME, LOGITS_NAME, SELECTION_LOGIT_NAME, SELECTION_NAME, InputSpec
from abstain.runtime import GraphOutputs, OnnxModel

PROBE_ATOL = 1e-4
#: Seconds one Triton call may take (connect and answer) before it fails; the service's own
#: request timeout (``ABSTAIN_TIMEOUT``, 30 s by default) caps it from above.
DEFAULT_TIMEOUT_S = 10.0


class TritonUnreachableError(ValueError):
    """Triton cannot be reached, or does not (yet) serve the pinned model version: maybe later."""


class GraphMismatchError(ValueError):
    """Triton answers, but with another graph than the calibrated one: never these thresholds."""


def probe_batch(spec: InputSpec, n: int = 8) -> np.ndarray:
    """A fixed float32 ``[n + 2, C, H, W]`` batch: seeded uniform pixels, then all-black and all-white."""
    rng = np.random.default_rng(20260211)
    x = rng.random((n, *spec.shape), dtype=np.float32)
    return np.concatenate([x, np.zeros((1, *spec.shape), np.float32), np.ones((1, *spec.shape), np.float32)])


class TritonBackend:
    """Triton Inference Server through ``tritonclient`` (HTTP, or gRPC for ``grpc://host:port``).

    Args:
        url: ``host:port`` of Triton's HTTP endpoint, or ``grpc://host:port``.
        model_name: the model-repository entry Triton serves (e.g. ``"digits"``).
        model_version: pinned version, the calibrated graph's version directory.
        timeout_s: timeout of each call: HTTP ``connection_timeout`` and ``network_timeout``,
            gRPC ``client_timeout`` (a deadline per call). A call past it raises, and the
            service answers 503 ``backend_unavailable`` instead of waiting for its own 504.
    """

    name = "triton"

    def __init__(
        self, url: str, model_name: str, model_version: str, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s should be > 0 seconds, but got {timeout_s!r}")
        self.protocol = "grpc" if url.startswith("grpc://") else "http"
        self.url = url.removeprefix("grpc://").removeprefix("http://")
        self.model_name, self.model_version = model_name, str(model_version)
        self.timeout_s = timeout_s
        #: ask for the optional selection_logit output too; :meth:`verify` sets it from the
        #: calibrated graph (a Triton entry serves the same graph, so the same outputs)
        self.selection_logit = False
        # the HTTP client (geventhttpclient) must not be shared between threads: one per thread
        self._local = threading.local()

    def _client(self):  # tritonclient.{http,grpc}.InferenceServerClient
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as triton

                client = triton.InferenceServerClient(self.url)  # deadline per call: _call_timeout
            else:
                import tritonclient.http as triton

                client = triton.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            self._local.client, self._local.module = client, triton
        return client

    def _call_timeout(self) -> dict[str, float]:
        """Per-call keyword of the gRPC client (the HTTP client has its timeouts built in)."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def infer(self, x: np.ndarray) -> GraphOutputs:
        client = self._client()
        triton = self._local.module
        inp = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        names = [LOGITS_NAME, SELECTION_NAME] + ([SELECTION_LOGIT_NAME] if self.selection_logit else [])
        outputs = [triton.InferRequestedOutput(name) for name in names]
        result = client.infer(
            self.model_name, [inp], model_version=self.model_version, outputs=outputs, **self._call_timeout()
        )
        return GraphOutputs(
            logits=result.as_numpy(LOGITS_NAME),
            selection=result.as_numpy(SELECTION_NAME).reshape(-1),
            selection_logit=(
                result.as_numpy(SELECTION_LOGIT_NAME).reshape(-1) if self.selection_logit else None
            ),
        )

    def verify(self, reference: OnnxModel) -> None:
        """Refuse (``ValueError``) unless Triton serves the calibrated graph ``reference``.

        Checks that the pinned version is ready, then compares outputs on :func:`probe_batch`.
        Raises :class:`TritonUnreachableError` (not reachable, version not ready: perhaps later)
        or :class:`GraphMismatchError` (another graph answers), both ``ValueError``.
        """
        where = (
            f"Triton at {self.url} ({self.protocol}) model {self.model_name!r} version {self.model_version}"
        )
        try:
            ready = self._client().is_model_ready(self.model_name, self.model_version, **self._call_timeout())
        except Exception as exc:  # connection refused, DNS, protocol errors: all mean "not there"
            raise TritonUnreachableError(f"cannot reach {where}: {exc}") from exc
        if not ready:
            raise TritonUnreachableError(
                f"{where} is not ready; serve the model repository holding {reference.path} "
                f"(version directory {self.model_version}) with Triton, or pass the right --triton-url"
            )
        self.selection_logit = reference.has_selection_logit
        x = probe_batch(reference.input_spec)
        try:
            remote = self.infer(x)
        except Exception as exc:  # gone between the two calls, or past the timeout
            raise TritonUnreachableError(f"cannot run the probe batch on {where}: {exc}") from exc
        local = reference.run(x)
        if remote.logits.shape != local.logits.shape or not (
            np.allclose(remote.logits, local.logits, atol=PROBE_ATOL, rtol=0)
            and np.allclose(remote.selection, local.selection, atol=PROBE_ATOL, rtol=0)
            and (
                remote.selection_logit is None
                or local.selection_logit is None
                or np.allclose(remote.selection_logit, local.selection_logit, atol=PROBE_ATOL, rtol=0)
            )
        ):
            diff = (
                np.abs(remote.logits - local.logits).max()
                if remote.logits.shape == local.logits.shape
                else "shape " + str(remote.logits.shape)
            )
            raise GraphMismatchError(
                f"{where} does not serve the calibrated graph {reference.path}: on a fixed probe batch "
                f"its outputs differ (max |Δlogit| = {diff}); deploy the same model.onnx to Triton or "
                "calibrate the graph Triton serves"
            )


def verify_triton_serves(
    url: str,
    graph_path: str | Path,
    model_name: str,
    model_version: str,
    graph_sha256: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Start-up check (``abstain serve`` and the service import): refuse unless Triton at ``url``
    serves the graph at ``graph_path`` as ``model_name`` version ``model_version``.

    With ``graph_sha256`` (the calibration's), the local reference must be exactly those bytes.
    Uses a one-thread ONNX Runtime session and a throwaway client; raises ``ValueError``.
    """
    reference = OnnxModel(Path(graph_path), intra_op_threads=1, prefer_cuda=False)
    if graph_sha256 is not None and reference.sha256 != graph_sha256:
        raise ValueError(
            f"{graph_path} changed on disk (sha256 {reference.sha256[:12]}…, calibrated "
            f"{graph_sha256[:12]}…); restart once the graph and its calibration agree"
        )
    TritonBackend(url, model_name, model_version, timeout_s=timeout_s).verify(reference)
