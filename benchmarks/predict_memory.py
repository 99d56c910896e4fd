"""Benchmark: ``abstain predict`` on a large PNG folder keeps its memory bounded by one batch.

Run: ``nice -n 10 python benchmarks/predict_memory.py [--sizes 2000,20000] [--batch-size 256]``.
Writes ``--sizes`` folders of 64×64 grey PNGs (digits test images upscaled, with noise, so
no two files are equal) under ``--root`` (default ``/tmp/abstain-predict-bench``, reused
when present), then runs ``abstain predict models/digits FOLDER --out OUT.parquet`` for each
in a fresh process and reports its peak RSS (``getrusage`` ``ru_maxrss``) and wall time.
If memory is bounded by one batch, peak RSS stays flat as the folder grows ten-fold.
Writes the table under ``## Offline predict (memory)`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from report import cpu_count, cpu_model, replace_section

HEADING = "Offline predict (memory)"
REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits"


def make_folder(folder: Path, n: int) -> None:
    """``n`` PNGs in 10 sub-folders (one per true class), made once."""
    from PIL import Image

    from abstain.datasets import load_digits

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == n:
        return
    test = load_digits("test")
    rng = np.random.default_rng(0)
    for i in range(n):
        j = i % len(test.y)
        big = np.kron(test.x[j, 0], np.ones((8, 8), np.float32))  # 8×8 → 64×64
        big = np.clip(big + rng.normal(0, 0.02, big.shape), 0, 1)
        sub = folder / test.class_names[test.y[j]]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(big * 255).astype(np.uint8), mode="L").save(sub / f"{i:06d}.png")


def child(folder: Path, out: Path, batch_size: int) -> None:
    """One measured run (in its own process, so ru_maxrss is this run's alone)."""
    from abstain.calibration.predict import run_predict

    t0 = time.perf_counter()
    summary = run_predict(MODEL, out, data=folder, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    figures = {
        "n": summary.inputs,
        "errors": summary.errors,
        "coverage": summary.coverage,
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--root", type=Path, default=Path("/tmp/abstain-predict-bench"))
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "OUT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        folder = args.root / f"pngs-{n}"
        make_folder(folder, n)
        out = args.root / f"out-{n}.parquet"
        command = [sys.executable, __file__, "--child", str(folder), str(out), str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(result)
        print(result)
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    ratio = rows[-1]["n"] / rows[0]["n"]
    lines = [
        f"## {HEADING}",
        "",
        f"`nice -n 10 python benchmarks/predict_memory.py --sizes {args.sizes} "
        f"--batch-size {args.batch_size}` — `abstain predict models/digits FOLDER --out OUT.parquet` "
        "on folders of 64×64 grey PNGs, each run in a fresh process; "
        "peak RSS is that process's `ru_maxrss` (Python, numpy, ONNX Runtime, Pillow and "
        "pyarrow included).",
        f"Machine: nproc {cpu_count()}, {cpu_model()}, numpy {np.__version__}, "
        f"Python {platform.python_version()}. Shared with other jobs while measured.",
        "",
        "| PNGs | batch | peak RSS (MB) | seconds | images/s |",
        "|---|---|---|---|---|",
        *[
            f"| {r['n']:,} | {args.batch_size} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | "
            f"{r['n'] / r['seconds']:.0f} |"
            for r in rows
        ],
        "",
        f"Growth from the smallest to the largest folder: {growth:.0f} MB for {ratio:g} times the images "
        "(not profiled further; what the code holds in proportion to the folder is the file list, one path "
        "per image, and Parquet's row-group footer). Pixels are held one batch at a time and records are "
        "written batch by batch.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        replace_section(HEADING, text)
        print(f"wrote the {HEADING!r} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
