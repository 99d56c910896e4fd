"""How many CPUs this process may really use: its affinity mask, capped by its cgroup's CPU quota.

``os.cpu_count()`` is the host's count. A container sees its cpuset in the affinity mask, but a
Kubernetes CPU *limit* is a CFS quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` in v1), invisible to both: a pod limited to 2 CPUs on a 64-core node
would start 64 ONNX Runtime threads and be throttled. The quota of the process's own cgroup
and of every ancestor applies; the smallest wins, rounded up to whole CPUs.

Standard library only (``abstain serve --help`` imports the settings without numpy).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs of the affinity mask, at most the cgroup quota rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The smallest CPU quota (in CPUs, e.g. 1.5) over this process's cgroup and its ancestors,
    cgroup v2 or v1; ``None`` when there is none (``max``, ``-1``) or nothing can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:  # "hierarchy-id:controllers:path"
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one unified hierarchy mounted at the root
            quotas += _quotas(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own mount
            for mount in (cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
                if mount.is_dir():
                    quotas += _quotas(mount, path, _v1_quota)
                    break
    return min(quotas) if quotas else None


def _quotas(mount: Path, path: str, read: object) -> list[float]:
    """The quota of ``mount``/``path`` and of each ancestor up to ``mount`` (a container's cgroup
    namespace shows its own cgroup as ``/``: then only the mount itself is read)."""
    found = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))  # type: ignore[operator]
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(directory: Path) -> float | None:
    try:  # "max 100000" (no limit) or "150000 100000" (1.5 CPUs)
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:  # cfs_quota_us is -1 when there is no limit
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
