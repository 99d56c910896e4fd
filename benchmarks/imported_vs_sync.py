"""Benchmark: an imported classifier and the shipped SYNC model, evaluated the same way.

Run: ``nice -n 10 python benchmarks/imported_vs_sync.py``. A scikit-learn logistic regression
is fitted on the digits *train* split, converted with skl2onnx, brought in with
``abstain import`` (softmax response as its selection score), calibrated on digits *val* with
the shipped model's documented targets (coverage 0.8, 0.9, 0.95; risk 0.05; δ = 0.05) and
evaluated on digits *test* next to ``models/digits`` (SelectiveNet trained with SYNC). Prints
one table and writes it under ``## Imported classifier vs SYNC`` in ``docs/benchmarks.md``.
Everything is deterministic (lbfgs, fixed splits), so one run is the figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from report import cpu_count, cpu_model, replace_section

from abstain.calibration.calibrate import run_calibration
from abstain.calibration.evaluate import run_evaluation
from abstain.datasets import load_digits
from abstain.export.importer import import_onnx

HEADING = "Imported classifier vs SYNC"
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "digits"
COVERAGES = ("1.0", "0.95", "0.9", "0.8")


def logistic_regression_onnx(out_dir: Path) -> tuple[Path, Path]:
    """LR on digits train → (model.onnx with input [N, 64] and probabilities [N, 10], labels.txt)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    train = load_digits("train")
    clf = LogisticRegression(max_iter=2000).fit(train.x.reshape(len(train.x), -1), train.y)
    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset=17,
    )
    graph, labels = out_dir / "lr.onnx", out_dir / "labels.txt"
    graph.write_bytes(onx.SerializeToString())
    labels.write_text("\n".join(train.class_names) + "\n")
    return graph, labels


def row(name: str, report: dict, score: str, points_too: bool = True) -> str:
    m = report["scores"][score]
    risks = " | ".join(f"{m['risk_at_coverage'][c] * 100:.2f}" for c in COVERAGES)
    points = {p["name"]: p for p in report["operating_points"]}
    cells = []
    for point in ("coverage-0.9", "risk-0.05"):
        p = points[point]
        risk = "—" if p["selective_risk"] is None else f"{p['selective_risk'] * 100:.2f}"
        cells.append(f"{p['realized_coverage'] * 100:.1f} / {risk}")
    if not points_too:  # the operating points use the calibrated score, shown in the row above
        cells = ["〃", "〃"]
    return f"| {name} | {score} | {risks} | {m['aurc'] * 100:.3f} | {' | '.join(cells)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="abstain-bench-import-") as tmp:
        tmp_path = Path(tmp)
        graph, labels = logistic_regression_onnx(tmp_path)
        imported = import_onnx(
            graph,
            "digits-lr",
            labels,
            tmp_path / "models",
            input_spec=(1, 8, 8),
            logits_output="probabilities",
            probabilities=True,
        )
        run_calibration(
            imported.model_path.parent,
            dataset="digits",
            split="val",
            coverages=[0.8, 0.9, 0.95],
            risks=[0.05],
            delta=0.05,
        )
        lr = run_evaluation(
            imported.model_path.parent, tmp_path / "eval-lr", dataset="digits", split="test"
        ).report
        sync = run_evaluation(SHIPPED, tmp_path / "eval-sync", dataset="digits", split="test").report
    lines = [
        f"## {HEADING}",
        "",
        "`nice -n 10 python benchmarks/imported_vs_sync.py` — `abstain evaluate` on digits test "
        f"(n={lr['data']['size']}) for a scikit-learn logistic regression brought in with `abstain import` "
        "(skl2onnx, `--probabilities`; its selection score is the softmax response) and for the shipped "
        "SYNC model `models/digits`. Both calibrated on digits val with coverage 0.8, 0.9, 0.95 and "
        "risk 0.05 (δ = 0.05). Deterministic: one run.",
        f"Machine: nproc {cpu_count()}, {cpu_model()}, numpy {np.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "| model | score | risk % @100 | @95 | @90 | @80 | AURC ×100 | coverage-0.9: coverage % / risk % "
        "| risk-0.05: coverage % / risk % |",
        "|---|---|---|---|---|---|---|---|---|",
        row("logistic regression (imported)", lr, "softmax_response"),
        row("SYNC SelectiveNet (shipped)", sync, "selection"),
        row("SYNC SelectiveNet (shipped)", sync, "softmax_response", points_too=False),
        "",
        "Risk at coverage and AURC are per score; the operating-point columns are what the calibrated "
        "points (each on its calibration's score) realise on test. 360 test images: one error is 0.28 %.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"lr_warnings": lr["warnings"], "sync_warnings": sync["warnings"]}), file=sys.stderr)
    if not args.no_write:
        replace_section(HEADING, text)
        print(f"wrote the {HEADING!r} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
