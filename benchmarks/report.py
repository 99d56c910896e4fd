"""Shared by the benchmark scripts: the machine they ran on, and writing one section of
``docs/benchmarks.md`` in place (atomically, other sections untouched)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from abstain.io import atomic_write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or "unknown CPU"


def cpu_count() -> int:
    """CPUs this process may use (what `nproc` prints)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def replace_section(heading: str, section: str, doc: Path = DOC) -> None:
    """Replace the ``## <heading>`` section of ``doc`` with ``section`` (append it if absent).

    ``section`` is the whole section including its ``## <heading>`` line. A section runs to
    the next ``## `` heading or the end of the file.
    """
    if not section.startswith(f"## {heading}\n"):
        raise ValueError(f"section should start with '## {heading}', but starts with {section[:40]!r}")
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    body = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    atomic_write_text(doc, text.rstrip("\n") + "\n")
