"""End to end on the real Fashion-MNIST: train → export → calibrate → evaluate, by the CLI.

The whole user flow on a dataset hard enough for the operating points to mean something
(digits is nearly perfect): ``abstain train --dataset fashion-mnist --loss sync --schedule step``, export to
a temporary model repository, calibrate on the fixed 5,000-image ``val`` split (coverage
0.7 / 0.8 / 0.9 / 0.95 and SGR risk 0.01 / 0.02 / 0.05 at δ = 0.05), and evaluate on the
official 10,000-image test split. Prints the commands' output and writes the operating
points table under ``## End to end (Fashion-MNIST)`` in ``docs/benchmarks.md``.

    nice -n 10 python benchmarks/end_to_end.py        # ≈ 4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import cpu_count, cpu_model, replace_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "End to end (Fashion-MNIST)"
COVERAGES = ("0.7", "0.8", "0.9", "0.95")
RISKS = ("0.01", "0.02", "0.05")


def abstain(*args: str) -> float:
    """Run one ``abstain`` command (output shown); return its wall seconds; raise if it fails."""
    print("$ abstain " + " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "abstain", *args], cwd=ROOT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: dataset's)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="abstain-e2e-") as tmp:
        run, repo, out = Path(tmp) / "run", Path(tmp) / "models", Path(tmp) / "eval"
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        seconds = {
            "train": abstain(
                "train",
                "--dataset",
                "fashion-mnist",
                "--loss",
                "sync",
                "--schedule",  # the schedule its docs/benchmarks.md figures were measured with
                "step",
                "--out",
                str(run),
                "--no-progress",
                *epochs,
            ),
            "export": abstain(
                "export", str(run / "checkpoint.pt"), "--name", "fashion-mnist", "--repository", str(repo)
            ),
            "calibrate": abstain(
                "calibrate",
                str(repo / "fashion-mnist"),
                "--dataset",
                "fashion-mnist",
                "--split",
                "val",
                "--coverage",
                *COVERAGES,
                "--risk",
                *RISKS,
                "--delta",
                "0.05",
            ),
            "evaluate": abstain(
                "evaluate",
                str(repo / "fashion-mnist"),
                "--dataset",
                "fashion-mnist",
                "--split",
                "test",
                "--out",
                str(out),
            ),
        }
        report = json.loads((out / "evaluation.json").read_text())
        calibration = json.loads((repo / "fashion-mnist" / "1" / "calibration.json").read_text())
    rows = []
    for p in report["operating_points"]:
        target = p.get("target_coverage") or p.get("target_risk")
        interval = p.get("coverage_prediction_interval", p.get("coverage_interval"))
        promised = (
            f"coverage in [{interval[0]:.4f}, {interval[1]:.4f}]"
            if interval
            else f"risk ≤ {p['target_risk']}"
        )
        rows.append(
            f"| {p['name']} | {target} | {promised} | {p['realized_coverage']:.4f} | "
            f"{p['selective_risk']:.4f} | {'yes' if p['guarantee_held'] else 'no'} |"
        )
    scores = report["scores"]
    score_rows = [
        f"| {name} | {m['aurc']:.5f} | {m['eaurc']:.5f} | {m['augrc']:.5f} |" for name, m in scores.items()
    ]
    section = "\n".join(
        [
            f"## {HEADING}",
            "",
            f"`nice -n 10 python benchmarks/end_to_end.py` on {cpu_count()} CPU cores ({cpu_model()}), "
            "no GPU. The CLI flow a user runs: `abstain train --dataset fashion-mnist --loss sync "
            "--schedule step` → "
            "`abstain export`",
            f"→ `abstain calibrate … --split val --coverage {' '.join(COVERAGES)} --risk {' '.join(RISKS)}`",
            "→ `abstain evaluate … --split test`. Wall seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + ".",
            f"Score chosen by validation AURC: `{calibration['operating_points'][0]['score']}`.",
            "",
            "Operating points, calibrated on val (5,000 images), measured on test (10,000 images).",
            "A coverage point's guarantee is its 95 % Clopper–Pearson interval, so about one in twenty",
            "is expected to miss; a risk point's is SGR's bound (holds with probability ≥ 0.95).",
            "",
            "| operating point | target | promised | test coverage | test selective risk | held |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Scores on test (×1, lower is better):",
            "",
            "| score | AURC | E-AURC | AUGRC |",
            "|---|---|---|---|",
            *score_rows,
        ]
    )
    print("\n" + section)
    if not args.no_write:
        replace_section(HEADING, section)
        print(f"\nwrote the {HEADING!r} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
