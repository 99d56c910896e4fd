"""``abstain predict``: the service's decisions, offline, in each output format.

Reference decisions come from the service's own code in-process: ``serving.validation``
decodes each PNG as an upload, the graph runs, ``serving.decisions.decide`` decides.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from abstain.calibration.predict import UnreadableInputError, run_predict
from abstain.datasets import load_digits
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel
from abstain.serving.decisions import decide
from abstain.serving.validation import decode_image

REPO = Path(__file__).resolve().parents[2]
VERSION = REPO / "models" / "digits" / "1"
FORMATS = ("jsonl", "csv", "parquet")


def read_records(path: Path) -> list[dict]:
    """Records back as dicts with ``None`` for missing values, whatever the format."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in rows]
    return pq.read_table(path).to_pylist()


def service_decisions(x: np.ndarray, point_name: str | None) -> list[dict]:
    model = OnnxModel(VERSION / "model.onnx")
    point = load_calibration(VERSION / "calibration.json").operating_point(point_name)
    out = model.run(x)
    return decide(out.logits, out.selection, point, model.class_names)


def assert_same(records: list[dict], expected: list[dict]) -> None:
    assert len(records) == len(expected)
    for got, want in zip(records, expected, strict=True):
        assert got["decision"] == want["decision"]
        label = want["label"] if want["decision"] == "predict" else want["candidate"]["label"]
        assert (got["label"] if want["decision"] == "predict" else got["candidate"]) == label
        assert float(got["confidence"]) == pytest.approx(want["confidence"], abs=1e-12)
        assert float(got["score_value"]) == pytest.approx(want["score_value"], abs=1e-12)
        assert float(got["threshold"]) == want["threshold"]
        assert got["operating_point"] == want["operating_point"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_digits_test_split_equals_the_service(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"d.{fmt}"
    summary = run_predict(
        VERSION, out, dataset="digits", split="test", batch_size=50, operating_point="risk-0.05"
    )
    test = load_digits("test")
    expected = service_decisions(test.x, "risk-0.05")
    records = read_records(out)
    assert_same(records, expected)
    assert [int(r["index"]) for r in records] == list(range(360))
    # the summary, worked out from the service's decisions and the true labels
    answered = [i for i, e in enumerate(expected) if e["decision"] == "predict"]
    wrong = sum(expected[i]["label"] != test.class_names[test.y[i]] for i in answered)
    assert (summary.inputs, summary.errors, summary.answered) == (360, 0, len(answered))
    assert summary.coverage == pytest.approx(len(answered) / 360)
    assert summary.selective_risk == pytest.approx(wrong / len(answered))
    assert summary.accuracy_answered == pytest.approx(1 - wrong / len(answered))


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 test digits as 8-bit PNGs in class folders (two levels deep), plus one broken file."""
    root = tmp_path_factory.mktemp("pngs")
    test = load_digits("test")
    for i in range(40):
        folder = root / test.class_names[test.y[i]] / "scan"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(test.x[i, 0] * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    (root / "3" / "scan").mkdir(parents=True, exist_ok=True)
    (root / "3" / "scan" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


@pytest.mark.parametrize("fmt", FORMATS)
def test_png_folder_equals_the_service_and_records_the_broken_file(
    tmp_path: Path, png_folder: Path, fmt: str
) -> None:
    out = tmp_path / f"d.{fmt}"
    summary = run_predict(VERSION, out, data=png_folder, batch_size=7)
    records = read_records(out)
    assert len(records) == 41 and summary.inputs == 41 and summary.errors == 1
    broken = [r for r in records if r["decision"] == "error"]
    assert len(broken) == 1 and broken[0]["source"].endswith("broken.png")
    assert "not a readable image" in broken[0]["error"]
    good = [r for r in records if r["decision"] != "error"]
    x = np.concatenate(
        [
            decode_image(Path(r["source"]).read_bytes(), OnnxModel(VERSION / "model.onnx").input_spec)
            for r in good
        ]
    )
    assert_same(good, service_decisions(x, None))
    # labels come from the class folders
    assert all(r["true_label"] == Path(r["source"]).relative_to(png_folder).parts[0] for r in records)
    assert summary.labelled == 40


def test_fail_fast_stops_and_writes_nothing(tmp_path: Path, png_folder: Path) -> None:
    out = tmp_path / "d.jsonl"
    with pytest.raises(UnreadableInputError, match=r"broken\.png"):
        run_predict(VERSION, out, data=png_folder, fail_fast=True)
    assert not out.exists() and os.listdir(tmp_path) == []  # no temp file left either


def test_npz_without_labels(tmp_path: Path) -> None:
    x = load_digits("test").x[:10]
    np.savez(tmp_path / "x.npz", x=x)
    summary = run_predict(VERSION, tmp_path / "d.jsonl", data=tmp_path / "x.npz")
    records = read_records(tmp_path / "d.jsonl")
    assert_same(records, service_decisions(x, None))
    assert summary.selective_risk is None and all("true_label" not in r for r in records)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_name": "d.txt"}, "extension should be one of"),
        ({"operating_point": "nope"}, "nope"),
        ({"data_file": "x.npy"}, "should be an image folder or an .npz"),
    ],
)
def test_bad_arguments_say_what_is_valid(tmp_path: Path, kwargs: dict, message: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=message):
        run_predict(
            VERSION,
            tmp_path / kwargs.get("out_name", "d.jsonl"),
            data=tmp_path / kwargs.get("data_file", "x.npy") if "data_file" in kwargs else None,
            dataset=None if "data_file" in kwargs else "digits",
            operating_point=kwargs.get("operating_point"),
        )


def test_cli_prints_the_summary(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from abstain.cli import app

    out = tmp_path / "d.csv"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(VERSION),
            "--dataset",
            "digits",
            "--split",
            "test",
            "--out",
            str(out),
            "--operating-point",
            "coverage-0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    records = read_records(out)
    answered = sum(r["decision"] == "predict" for r in records)
    assert f"answered {answered}, coverage {answered / 360:.4f}" in result.output
    assert "selective risk" in result.output and f"wrote {out}" in result.output
