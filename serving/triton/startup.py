"""Start-up checks of a Triton backend, shared by ``abstain serve`` and the service's import."""

from __future__ import annotations

from abstain.serving.config.settings import ServeSettings
from abstain.serving.inference.artifacts import Artifacts


def selective_entry(settings: ServeSettings, artifacts: Artifacts) -> str | None:
    """The Triton model that serves a selective entry (``abstain export-selective``) and so decides
    itself, or ``None`` when Triton (if used) serves the calibrated graph as it is."""
    if settings.backend == "triton" and settings.triton_model not in (None, artifacts.name):
        return settings.triton_model
    return None


def verify_remote_backend(settings: ServeSettings, artifacts: Artifacts) -> str | None:
    """The start-up check of a Triton backend, shared by ``abstain serve`` and the service's import.

    Raises when Triton serves another graph (or a selective entry built from another
    calibration): the service must refuse to start. Returns a warning, instead of raising, when
    Triton is not reachable *yet* — pods start in any order, so the service starts not ready and
    its :class:`~abstain.serving.triton.monitor.TritonMonitor` makes it ready once the graph
    verifies. ``None`` for the embedded backend or a verified graph.
    """
    if settings.backend != "triton":
        return None
    selective = selective_entry(settings, artifacts)
    if selective is not None:
        from abstain.serving.triton.selective_backend import verify_selective_triton

        verify_selective_triton(
            settings.triton_url,
            artifacts.version_dir,
            selective,
            artifacts.calibration.names,
            timeout_s=settings.triton_timeout,
        )
        return None
    from abstain.serving.triton.backend import TritonUnreachableError, verify_triton_serves

    try:
        verify_triton_serves(
            settings.triton_url,
            artifacts.graph_path,
            artifacts.name,
            artifacts.version,
            graph_sha256=artifacts.graph_sha256,
            timeout_s=settings.triton_timeout,
        )
    except TritonUnreachableError as exc:
        return f"{exc}; starting, not ready until Triton serves the graph"
    return None
