"""Benchmark: calibrating one million scores (coverage points + SGR) must take well under 2 s.

Run: ``nice -n 10 python benchmarks/calibration.py [--n 1000000]``. Prints the figures and
writes them to ``docs/benchmarks.md`` under ``## Calibration`` (replacing only that section),
with the machine (nproc, CPU model, numpy version).

What is timed is the numpy maths of ``abstain calibrate`` after inference: one sort of the
scores (:class:`abstain.thresholds.RankedScores`), three coverage points with their
Clopper–Pearson intervals, and two SGR risk points. Synthetic data: scores uniform in [0, 1],
P(error | score s) = 0.2 (1 - s), so the risk falls as the threshold rises, as in a real model.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from report import cpu_count, cpu_model, replace_section

from abstain.thresholds import RankedScores, coverage_point, sgr_point

HEADING = "Calibration"


def run(n: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    scores = rng.random(n)
    errors = (rng.random(n) < 0.2 * (1.0 - scores)).astype(np.int64)
    timings: dict[str, list[float]] = {"sort": [], "coverage points": [], "SGR points": [], "total": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        ranked = RankedScores.from_arrays(scores, errors)
        t1 = time.perf_counter()
        for c in (0.8, 0.9, 0.95):
            coverage_point(ranked, c, 0.95)
        t2 = time.perf_counter()
        results = [sgr_point(ranked, r, 0.05) for r in (0.02, 0.05)]
        t3 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            timings[key].append(value)
    assert all(r.feasible for r in results), "benchmark data should admit both risk targets"
    return {key: float(np.median(v)) for key, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    args = parser.parse_args()
    t = run(args.n, args.repeats)
    machine = (
        f"nproc {cpu_count()}, {cpu_model()}, numpy {np.__version__}, Python {platform.python_version()}"
    )
    lines = [
        f"## {HEADING}",
        "",
        f"`nice -n 10 python benchmarks/calibration.py` — {args.n:,} scores, median of {args.repeats} runs.",
        f"Machine: {machine}. Shared with other jobs while measured.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {key} | {value:.3f} |" for key, value in t.items()],
        "",
        "Target: total well under 2 s (issue 4).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        replace_section(HEADING, text)
        print(f"wrote the {HEADING!r} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
