"""Benchmark: what the baked-in decision costs in ONNX Runtime (selective graph vs base graph).

Run: ``nice -n 10 python benchmarks/selective_graph.py [--repeats 7]``. Prints the figures and
writes them to ``docs/benchmarks.md`` under ``## Selective graph`` (replacing only that section),
with the machine (nproc, CPU model, onnxruntime version).

Both graphs are the shipped ``models/digits/1`` and ``models/digits-selective/1`` (the same
network plus the decision nodes of ``abstain.export.selective_graph``), each in its own ONNX
Runtime session with one intra-op thread (as Triton's and the service's sessions on this
machine). Timed: ``session.run`` of every output, on digits test images, at batch 1 (latency
per request) and batch 256 (throughput). Medians over ``repeats`` rounds, each round
alternating the two graphs so that drift on a shared machine hits both alike; the spread is the
min-max over rounds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from report import cpu_count, cpu_model, replace_section

from abstain.contract import INPUT_NAME, MODEL_FILENAME
from abstain.datasets import load_digits

HEADING = "Selective graph"
ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {
    "base": ROOT / "models/digits/1" / MODEL_FILENAME,
    "selective": ROOT / "models/digits-selective/1" / MODEL_FILENAME,
}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def time_per_call(sess: ort.InferenceSession, x: np.ndarray | dict, seconds: float) -> float:
    """Mean seconds per ``run`` over a loop of about ``seconds`` (after a short warm-up)."""
    feeds = x if isinstance(x, dict) else {INPUT_NAME: x}
    for _ in range(20):
        sess.run(None, feeds)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            sess.run(None, feeds)
        calls += 50
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="per graph, batch size and round")
    args = parser.parse_args()
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    sessions = {name: session(path) for name, path in GRAPHS.items()}
    # where the time goes: the decision nodes alone, fed the base graph's outputs
    from abstain.export.selective_graph import decision_model
    from abstain.operating_points import load_calibration

    points = load_calibration(GRAPHS["base"].parent / "calibration.json").operating_points
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    decision = ort.InferenceSession(
        decision_model(points, 10).SerializeToString(),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    images = load_digits("test").x
    rows = []
    for batch in (1, 256):
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        rounds = {name: [] for name in sessions}
        for _ in range(args.repeats):
            for name, sess in sessions.items():
                rounds[name].append(time_per_call(sess, x, args.seconds))
        logits, selection = sessions["base"].run(None, {INPUT_NAME: x})
        feeds = {"logits": logits, "selection": selection}
        alone = np.median([time_per_call(decision, feeds, args.seconds) for _ in range(3)])
        base, sel = (np.array(rounds[k]) for k in ("base", "selective"))
        overhead = np.median(sel) / np.median(base) - 1.0
        rows.append((batch, base, sel, overhead, alone))
        print(
            f"batch {batch}: base {np.median(base) * 1e6:.1f} µs, selective {np.median(sel) * 1e6:.1f} µs, "
            f"decision +{overhead * 100:.1f} %, decision nodes alone {alone * 1e6:.1f} µs"
        )
    table = "\n".join(
        f"| {b} | {np.median(base) * 1e6:.1f} ({base.min() * 1e6:.1f}–{base.max() * 1e6:.1f}) "
        f"| {np.median(sel) * 1e6:.1f} ({sel.min() * 1e6:.1f}–{sel.max() * 1e6:.1f}) "
        f"| {o * 100:+.1f} % | {'yes' if o < 0.05 else 'no'} | {a * 1e6:.1f} |"
        for b, base, sel, o, a in rows
    )
    section = (
        f"## {HEADING}\n\n"
        f"`nice -n 10 python benchmarks/selective_graph.py --repeats {args.repeats}` on {cpu_count()} CPU "
        f"cores ({cpu_model()}), onnxruntime {ort.__version__}, no GPU; one intra-op thread per session; "
        f"load average before the run {load_before} (machine shared with other jobs).\n"
        "ONNX Runtime on `models/digits/1` (base: logits, selection) vs `models/digits-selective/1` "
        "(the same graph + class_index, confidence, scores and accept for 4 operating points). "
        "Microseconds per `session.run`, median over rounds (min–max); target: the decision costs < 5 %. "
        "Last column: the decision nodes alone (`decision_model`, 8 nodes, fed the base graph's outputs), "
        "where the time goes: at batch 1 it is ONNX Runtime's fixed per-node cost, not arithmetic.\n\n"
        "| batch | base µs | selective µs | decision cost | < 5 % | decision alone µs |\n"
        "|---|---|---|---|---|---|\n"
        f"{table}\n"
    )
    replace_section(HEADING, section)


if __name__ == "__main__":
    main()
