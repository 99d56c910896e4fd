"""Usable CPUs: the affinity mask capped by the cgroup CPU quota (a Kubernetes CPU limit).

The cgroup files are written here in the kernel's own formats (``/proc/self/cgroup`` lines,
v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from abstain.serving.config.cpus import cgroup_cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_and_its_ancestors(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/kubepods/pod1/ctr\n")
    root = tmp_path / "cgroup"
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")  # no limit of its own
    write(root / "kubepods/pod1/cpu.max", "150000 100000\n")  # the pod's: 1.5 CPUs
    write(root / "kubepods/cpu.max", "400000 100000\n")
    assert cgroup_cpu_quota(proc, root) == 1.5  # the smallest on the way up
    assert usable_cpus(proc, root) == min(AFFINITY, 2)  # rounded up


def test_cgroup_v1_quota_in_the_cpu_controller_mount(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    mount = tmp_path / "cgroup" / "cpu,cpuacct"
    write(mount / "docker/abc/cpu.cfs_quota_us", "50000\n")
    write(mount / "docker/abc/cpu.cfs_period_us", "100000\n")
    write(mount / "cpu.cfs_quota_us", "-1\n")  # the root: no limit
    write(mount / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc, tmp_path / "cgroup") == 0.5
    assert usable_cpus(proc, tmp_path / "cgroup") == 1  # half a CPU is still one thread


@pytest.mark.parametrize(
    "files",
    [
        {},  # no cgroup files at all (not Linux, or not mounted)
        {"cpu.max": "max 100000\n"},  # v2, no limit
        {"cpu.max": "garbage\n"},
    ],
)
def test_no_quota_leaves_the_affinity_mask(tmp_path: Path, files: dict[str, str]) -> None:
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/\n")
    for name, text in files.items():
        write(tmp_path / "cgroup" / name, text)
    assert cgroup_cpu_quota(proc, tmp_path / "cgroup") is None
    assert usable_cpus(proc, tmp_path / "cgroup") == AFFINITY
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "cgroup") is None
