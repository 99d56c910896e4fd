"""Fixtures that start real servers on 127.0.0.1 (``bentoml serve``).

Each start costs seconds on a 2-core machine, so the embedded-model server is started once
per session with 2 workers and shared; tests read metric *deltas* around their own requests.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.servers import (
    MODEL_DIR,
    REPO,
    Server,
    bentoml_command,
    free_port,
    service_env,
    stop,
    wait_ready,
)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: ``start_server(model_dir=..., workers=2, ...)`` → a ready :class:`Server`
    (``target=`` another ``module:Service`` to serve, e.g. the test probe; ``wait="/livez"`` for a
    service that is up but not ready)."""
    started: list[subprocess.Popen] = []
    homes: list[Path] = []

    def start(
        target: str = "abstain.serving.service:Abstain", wait: str = "/readyz", **abstain: str | int | float
    ) -> Server:
        port = free_port()
        run = tmp_path_factory.mktemp("bentoml")
        log, home = run / "server.log", run / "home"
        homes.append(home)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                bentoml_command(port, target),
                env=service_env(home, **abstain),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}{wait}", process, log)
        return Server(url, process, log)

    yield start
    try:
        for process in started:
            try:
                stop(process)
            except (OSError, subprocess.SubprocessError) as exc:  # gone already, or will not die
                print(f"could not stop server {process.pid}: {exc!r}")
    finally:
        # the servers' BENTOML_HOMEs (their metrics files); the logs stay with pytest's tmp_path
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    """The embedded digits model, 2 workers (metrics must add up across them)."""
    return start_server(model_dir=MODEL_DIR, workers=2, ort_threads=1)


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the served model entry; returns its version directory."""
    entry = tmp_path / "models" / "digits"
    shutil.copytree(MODEL_DIR.parent, entry)
    return entry / MODEL_DIR.name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server (Debian's package) for the session: the decision store's tests."""
    from tests.serving.postgres import postgres_bin, running_postgres

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
    with running_postgres() as url:
        yield url


def empty_postgres(url: str) -> str:
    """``url`` with the decision store's tables dropped (each user starts from an empty store)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS decisions, review")
    return url
