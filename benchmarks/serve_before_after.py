"""`abstain serve` at two commits, alternated point by point: is the request path any slower?

Each commit is installed as a wheel would install it (``pip install --no-deps --target``) into
its own folder, and served from there with ``bentoml serve`` (defaults: workers, store on),
both servers up at once; for each graph (the shipped digits model and the CIFAR-size
VGG-16-BN of ``benchmarks/serve_peers.py``), each body (JSON and ``.npy``, one image) and
1 / 8 / 32 connections, ``wrk`` runs against the two in turn, ``--repeats`` times, so that a
drift of the machine falls on both alike. Reports the medians and the ratio after / before,
and writes the "Serving: before and after" section of docs/benchmarks.md.

    python benchmarks/serve_before_after.py --before 947a802      # ≈ 10 min on 2 cores

Run it on quiet cores: nothing else busy, the load generator takes one of the two.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import cpu_count, cpu_model, replace_section  # noqa: E402
from serve_peers import LUA, make_vgg, npy_bytes, start_bentoml, wrk  # noqa: E402

from abstain.runtime import OnnxModel  # noqa: E402
from tests.serving.servers import stop  # noqa: E402

SECTION = "Serving: before and after"


def install(rev: str, into: Path) -> str:
    """``rev`` checked out and installed (no dependencies) into ``into``; returns its short hash."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    src = into.with_name(into.name + "-src")
    subprocess.run(["git", "worktree", "add", "--detach", str(src), rev], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--target", str(into), str(src)],
            check=True, capture_output=True,
        )  # fmt: skip
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=REPO, check=True)
    return sha


def serve(site: Path, version_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``bentoml serve`` of the service installed in ``site`` (it comes first on ``sys.path``)."""
    env = {"PYTHONPATH": str(site), "ABSTAIN_MODEL_DIR": str(version_dir)}
    return start_bentoml("abstain.serving.service:Abstain", env, log, cwd=site)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="947a802", help="the commit to compare with")
    parser.add_argument("--after", default="HEAD", help="the commit measured against it")
    parser.add_argument("--seconds", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per point and commit (median)")
    parser.add_argument("--graphs", default="digits,vgg", help="comma-separated: digits, vgg")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="before-after-") as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "body.lua"
        lua.write_text(LUA)
        shas = {"before": install(args.before, tmp / "before"), "after": install(args.after, tmp / "after")}
        graphs = {"digits": REPO / "models" / "digits" / "1"}
        if "vgg" in args.graphs.split(","):
            graphs["vgg"] = make_vgg(tmp)
        rows = []
        for name in args.graphs.split(","):
            version_dir = graphs[name]
            spec = OnnxModel(version_dir / "model.onnx", prefer_cuda=False).input_spec
            x = np.random.default_rng(1).random((1, *spec.shape), dtype=np.float32)
            bodies = {
                "JSON": (tmp / f"{name}.json", "application/json"),
                ".npy": (tmp / f"{name}.npy", "application/x-npy"),
            }
            bodies["JSON"][0].write_text('{"pixels": ' + str(x[0].tolist()) + "}")
            bodies[".npy"][0].write_bytes(npy_bytes(x[0]))
            servers = {side: serve(tmp / side, version_dir, tmp / f"{name}-{side}.log") for side in shas}
            try:
                for body, (path, ctype) in bodies.items():
                    for c in (1, 8, 32):
                        rps: dict[str, list[float]] = {side: [] for side in shas}
                        for _ in range(args.repeats):
                            for side, (_, url) in servers.items():
                                point = wrk(f"{url}/predict", path, ctype, c, args.seconds, lua)
                                if point.non2xx:
                                    raise RuntimeError(f"{side} answered {point.non2xx} errors at c={c}")
                                rps[side].append(point.rps)
                        before, after = (statistics.median(rps[s]) for s in ("before", "after"))
                        rows.append((name, body, c, before, after, rps))
                        print(f"[{name}] {body:5s} c={c:<3d} before {before:7.0f}  after {after:7.0f}  "
                              f"ratio {after / before:.3f}", flush=True)  # fmt: skip
            finally:
                for process, _ in servers.values():
                    stop(process)
    minutes = (time.monotonic() - started) / 60
    lines = [
        f"## {SECTION}",
        "",
        f"`python benchmarks/serve_before_after.py --before {args.before}` ({minutes:.0f} min) on "
        f"{cpu_model()}, {cpu_count()} CPUs: `abstain serve` at {shas['before']} (before) and "
        f"{shas['after']} (after), both installed as wheels and served with their defaults, "
        "one-image `POST /predict` by `wrk` "
        f"(one thread), {args.seconds} s a run, the two alternated run by run, {args.repeats} runs a "
        "point; requests per second, medians.",
        "",
        "| graph | body | connections | before rps | after rps | after / before | range over the runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, body, c, before, after, runs in rows:
        lo, hi = min(runs["after"]) / max(runs["before"]), max(runs["after"]) / min(runs["before"])
        lines.append(
            f"| {name} | {body} | {c} | {before:.0f} | {after:.0f} | {after / before:.3f} "
            f"| {lo:.2f}–{hi:.2f} |"
        )
    worst = min(after / before for *_, before, after, _ in rows)
    lines += [
        "",
        f"Lowest ratio of the medians: {worst:.3f} (the target is ≥ 0.95); the range is the worst and "
        "best after-run against the best and worst before-run of the point.",
    ]
    print("\n".join(lines))
    if not args.no_doc:
        replace_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
