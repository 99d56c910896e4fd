"""The ``abstain`` entry point: argument rewriting and one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from abstain.cli import join_multi_value_options

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["calibrate", "m", "--coverage", "0.8", "0.9", "0.95"],
            ["calibrate", "m", "--coverage", "0.8,0.9,0.95"],
        ),
        (
            ["calibrate", "--coverage", "0.8", "0.9", "m", "--risk", "0.02", "--delta", "0.05"],
            ["calibrate", "--coverage", "0.8,0.9", "m", "--risk", "0.02", "--delta", "0.05"],
        ),
        (["calibrate", "m", "--coverage", "0.8,0.9"], ["calibrate", "m", "--coverage", "0.8,0.9"]),
        (
            ["calibrate", "m", "--coverage", "abc"],
            ["calibrate", "m", "--coverage", "abc"],
        ),  # click reports it
        (
            ["train", "--coverage", "0.8", "0.9"],
            ["train", "--coverage", "0.8", "0.9"],
        ),  # other commands untouched
    ],
)
def test_space_separated_targets_are_joined(argv: list[str], expected: list[str]) -> None:
    assert join_multi_value_options(argv) == expected


def run_abstain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "abstain", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_space_separated_coverages_reach_calibrate() -> None:
    # 1.5 is out of range: the command fails fast, and only after parsing all three values
    result = run_abstain(
        "calibrate", "models/digits", "--dataset", "digits", "--coverage", "0.8", "0.9", "1.5"
    )
    assert result.returncode == 2
    assert "coverage targets should be in (0, 1], but got 1.5" in result.stderr


def test_user_error_is_one_line_without_traceback() -> None:
    result = run_abstain("train", "--dataset", "nope")
    assert result.returncode == 2
    assert "dataset should be one of" in result.stderr
    assert "Traceback" not in result.stderr
