"""Benchmark: ``abstain predict`` in one process against ``--engine ray`` with 1 and 2 actors.

Run: ``python benchmarks/predict_ray.py [--images 20000]`` on quiet cores. Writes that many
8×8 PNGs (digits test images, repeated; ``benchmarks/predict_memory.py``'s folder) and decides
them with the shipped digits model three ways, in one run:

* ``abstain predict FOLDER --out x.parquet``, a fresh process (peak RSS from ``getrusage``);
* ``--engine ray`` with 1 and with 2 actors, on one local Ray cluster started once (the
  cluster's start is timed apart: it is paid once per cluster, not per job); each actor's peak
  RSS comes from a :class:`Selector` subclass that reports its own ``ru_maxrss``.

Images per second of the whole job (listing, reading, decoding, inference, writing), the
ratio to the single process, and the peak memory per process. Writes ``## Offline prediction
on Ray`` in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from predict_memory import write_folder  # noqa: E402
from report import cpu_count, cpu_model, replace_section  # noqa: E402

from abstain.calibration.selector import Selector  # noqa: E402

HEADING = "Offline prediction on Ray"
MODEL = REPO / "models" / "digits"


class PeakRss(Selector):
    """A Selector that writes its process's peak RSS (KiB) to ``<report_dir>/<pid>`` per batch."""

    report_dir = ""

    def records(self, batch):  # type: ignore[no-untyped-def]
        rows = super().records(batch)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(self.report_dir, str(os.getpid())).write_text(str(peak))
        return rows


def single_process(folder: Path, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of plain ``abstain predict`` in a fresh child process."""
    script = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    argv = [sys.executable, "-m", "abstain", "predict", str(MODEL), str(folder), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, int(done.stdout.split()[-1]) / 1024


def on_ray(folder: Path, out: Path, actors: int, cpus_per_actor: float, work: Path) -> tuple[float, float]:
    """Seconds of one ``--engine ray`` job on the running cluster, and its actors' largest peak RSS."""
    from abstain.calibration.ray_engine import run_predict_ray

    report = work / f"rss-{actors}"
    report.mkdir()
    PeakRss.report_dir = str(report)
    start = time.perf_counter()
    run_predict_ray(
        MODEL, out, input_path=folder, concurrency=actors, cpus_per_actor=cpus_per_actor,
        progress=False, selector_class=PeakRss,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peaks = [int(p.read_text()) / 1024 for p in report.iterdir()]
    return seconds, max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="abstain-predict-ray-") as tmp:
        work = Path(tmp)
        folder = work / "images"
        write_folder(folder, args.images)
        rows: list[tuple[str, float, float]] = []

        seconds, rss = single_process(folder, work / "single.parquet")
        rows.append(("`abstain predict` (one process)", seconds, rss))
        print(f"single process: {seconds:.1f} s, {rss:.0f} MiB", flush=True)

        start = time.perf_counter()
        ray.init(num_cpus=cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray_start = time.perf_counter() - start
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            # two actors on two cores: 0.75 CPU each leaves the read and write tasks room
            for actors, cpus in ((1, 1.0), (2, 0.75)):
                seconds, rss = on_ray(folder, work / f"ray-{actors}", actors, cpus, work)
                name = f"`--engine ray --concurrency {actors} --cpus-per-actor {cpus:g}`"
                rows.append((name, seconds, rss))
                print(f"ray, {actors} actor(s): {seconds:.1f} s, actor peak {rss:.0f} MiB", flush=True)
            driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        finally:
            ray.shutdown()

    base = args.images / rows[0][1]
    lines = [
        f"## {HEADING}",
        "",
        f"`python benchmarks/predict_ray.py --images {args.images}` on {cpu_model()}, {cpu_count()} CPUs, "
        f"Python {platform.python_version()}, Ray {ray.__version__}: {args.images:,} 8×8 PNGs "
        "(digits test images, repeated), decided by the shipped digits model at its default point, "
        "written as Parquet. Whole jobs: listing, reading, decoding, inference and writing.",
        "",
        "| engine | seconds | images/s | × one process | peak RSS per process |",
        "|---|---|---|---|---|",
    ]
    for name, seconds, rss in rows:
        rate = args.images / seconds
        lines.append(f"| {name} | {seconds:.1f} | {rate:,.0f} | {rate / base:.2f} | {rss:.0f} MiB |")
    lines += [
        "",
        f"Starting the local Ray cluster took {ray_start:.1f} s more (once per cluster, not per job); "
        f"the Ray driver's own peak RSS was {driver_rss:.0f} MiB. Peak RSS of a Ray row is its largest "
        "actor's.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    print(json.dumps({"rows": rows, "ray_start_s": ray_start}))
    if not args.no_doc:
        replace_section(HEADING, section)


if __name__ == "__main__":
    main()
