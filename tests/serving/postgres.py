"""A real PostgreSQL server for tests, from Debian's ``postgresql`` package, on 127.0.0.1.

``initdb`` + ``pg_ctl`` in a temporary directory, on a free port, trust authentication for
local TCP only. PostgreSQL refuses to run as root: under root the server runs as the
``postgres`` user the Debian package creates (the data directory is handed to it).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.serving.servers import free_port


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with ``initdb`` and ``pg_ctl``, if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start PostgreSQL in a fresh temporary directory; yield a ``postgresql://`` URL; always stop
    it and remove the directory. (Not under pytest's tmp_path: that is private to root.)"""
    bindir = postgres_bin()
    assert bindir is not None, "PostgreSQL is not installed (apt-get install postgresql)"
    data = Path(tempfile.mkdtemp(prefix="abstain-test-pg-"))
    started = False
    try:  # the directory goes whatever fails: initdb, the start, the tests
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        port = free_port()
        subprocess.run(
            _as_server_user(
                [str(bindir / "initdb"), "-D", str(data), "-U", "abstain", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off"
        log = data / "server.log"
        started = True  # pg_ctl may have started the server even if it fails or times out
        subprocess.run(
            _as_server_user(
                [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"postgresql://abstain@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(data, ignore_errors=True)
