"""Benchmark: ``abstain predict`` streams folders — peak memory does not grow with the folder.

Run: ``python benchmarks/predict_memory.py [--sizes 2000,20000]``. Writes that many 8×8 PNGs
(digits test images, repeated) into a temporary folder, runs ``abstain predict models/digits
FOLDER --out decisions.parquet`` in a fresh process for each size, and reports the child's
peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time. Writes the
table to ``docs/benchmarks.md`` under ``## Offline prediction memory``.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from report import cpu_count, cpu_model, replace_section

from abstain.datasets import load_digits

HEADING = "Offline prediction memory"
REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, n: int) -> None:
    x = np.round(load_digits("test").x[:, 0] * 255).astype(np.uint8)
    for i in range(n):
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i % len(x)]).save(sub / f"{i:06d}.png")


def peak_rss_mib(folder: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of one ``abstain predict`` run in a fresh child process."""
    script = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            sys.executable,
            "-m",
            "abstain",
            "predict",
            str(REPO / "models" / "digits"),
            str(folder),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return int(done.stdout.strip()) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "pngs"
            write_folder(folder, n)
            rss, seconds = peak_rss_mib(folder, Path(tmp) / "decisions.parquet")
        rows.append(f"| {n:,} | {rss:.0f} | {seconds:.1f} | {n / seconds:,.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"## {HEADING}",
            "",
            f"`python benchmarks/predict_memory.py --sizes {args.sizes}` — `abstain predict models/digits "
            "FOLDER --out decisions.parquet` (batch 256, the default) on folders of 8×8 PNGs, each in a "
            "fresh process; peak RSS of that process. The folder is listed whole (one path per file), "
            "the pixels are decoded one batch at a time.",
            f"Machine: {platform.machine()}, {cpu_count()} CPU cores ({cpu_model()}), Python "
            f"{platform.python_version()}; shared with other jobs while measured.",
            "",
            "| images | peak RSS (MiB) | seconds | images/s |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    replace_section(HEADING, text)


if __name__ == "__main__":
    main()
