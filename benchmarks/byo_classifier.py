"""Benchmark: a classifier made elsewhere, imported, vs the shipped SYNC model — one table.

Run: ``python benchmarks/byo_classifier.py``. It fits scikit-learn's logistic regression on the
digits *train* split, converts it with skl2onnx, puts it behind the contract with
``abstain import`` (selection = softmax response), calibrates it on the *val* split with the
same targets as the shipped model, and evaluates both on the *test* split with ``abstain
evaluate``'s own code. Prints the table and writes it to ``docs/benchmarks.md`` under
``## Bring your own classifier``.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

from report import cpu_count, cpu_model, replace_section

from abstain.calibration.calibrate import run_calibration
from abstain.calibration.evaluate import run_evaluation
from abstain.datasets import load_digits
from abstain.export.importer import import_onnx

HEADING = "Bring your own classifier"
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "digits"
COVERAGES, RISKS = [0.8, 0.9, 0.95], [0.05]


def imported_lr(repo: Path) -> Path:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    train = load_digits("train")
    x = train.x.reshape(len(train.y), -1)
    lr = LogisticRegression(max_iter=5000).fit(x, train.y)
    graph = to_onnx(lr, x[:1], options={"zipmap": False}, target_opset=17).SerializeToString()
    import_onnx(
        graph,
        "digits-lr",
        list(train.class_names),
        repo,
        input_spec="1,8,8",
        logits_output="probabilities",
        probabilities=True,
    )
    run_calibration(repo / "digits-lr", dataset="digits", split="val", coverages=COVERAGES, risks=RISKS)
    return repo / "digits-lr"


def row(label: str, report: dict, score_note: str = "") -> str:
    points = {p["name"]: p for p in report["operating_points"]}
    score = next(iter(p["score"] for p in report["operating_points"]))
    m = report["scores"][score]
    cov = points["coverage-0.9"]
    risk = points["risk-0.05"]
    accuracy = report["data"]["accuracy"]
    return (
        f"| {label} | {score}{score_note} | {accuracy * 100:.2f} | {m['aurc'] * 100:.3f} | "
        f"{m['risk_at_coverage']['0.8'] * 100:.2f} | {cov['realized_coverage']:.4f} / "
        f"{(cov['selective_risk'] or 0) * 100:.2f} | {risk['realized_coverage']:.4f} / "
        f"{(risk['selective_risk'] or 0) * 100:.2f} |"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lr_dir = imported_lr(Path(tmp) / "models")
        lr = run_evaluation(lr_dir, Path(tmp) / "eval-lr", dataset="digits", split="test").report
        sync = run_evaluation(SHIPPED, Path(tmp) / "eval-sync", dataset="digits", split="test").report
    lines = [
        f"## {HEADING}",
        "",
        "`python benchmarks/byo_classifier.py` — scikit-learn's logistic regression on the digits "
        "train split, converted by skl2onnx and wrapped by `abstain import` (its selection score is "
        "the softmax response), calibrated on val with the shipped model's targets, and both "
        "evaluated on test (n=360) by `abstain evaluate`'s code.",
        f"Machine: {platform.machine()}, {cpu_count()} CPU cores ({cpu_model()}), Python "
        f"{platform.python_version()}.",
        "",
        "| model | score it thresholds | test accuracy % | AURC ×100 | risk % @ 80 % coverage | "
        "coverage-0.9: coverage / risk % | risk-0.05: coverage / risk % |",
        "|---|---|---|---|---|---|---|",
        row("shipped SYNC model (`models/digits`)", sync),
        row("imported logistic regression", lr, " (= softmax response)"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    replace_section(HEADING, text)


if __name__ == "__main__":
    sys.exit(main())
