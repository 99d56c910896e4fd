"""Fixtures of the deploy/ tests: the promtool binary and the exported metric names."""

from __future__ import annotations

import shutil

import pytest
from deploy_helpers import COUNTERS, GAUGES, HISTOGRAMS, OPTIONAL_HISTOGRAMS


@pytest.fixture(scope="session")
def exported_metrics() -> frozenset[str]:
    """Every series name the service's /metrics may carry."""
    names = set(COUNTERS) | set(GAUGES)
    for h in (*HISTOGRAMS, *OPTIONAL_HISTOGRAMS):
        names |= {h, f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return frozenset(names)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package (see .ci/run)")
    return path
