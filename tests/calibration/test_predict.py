"""``abstain predict``: offline decisions equal the service's, in every output format."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from abstain.calibration.data_sources import image_to_pixels
from abstain.calibration.predict import COLUMNS, run_predict
from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME
from abstain.datasets import load_digits
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel
from tests.answer_helpers import decide

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "digits"


def read_records(path: Path) -> list[dict]:
    """Records back from any output format, with the types of JSON."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        types = {
            "class_index": int,
            "confidence": float,
            "score_value": float,
            "threshold": float,
            "correct": lambda v: v == "True",
            "prediction_set": json.loads,
        }
        return [{k: (None if v == "" else types.get(k, str)(v)) for k, v in row.items()} for row in rows]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def service_answers(pixels: np.ndarray, point_name: str | None) -> list[dict]:
    """What ``abstain serve`` answers for these pixels: its graph runner and its decide()."""
    version_dir = sorted(p for p in MODEL_DIR.iterdir() if p.is_dir())[-1]
    model = OnnxModel(version_dir / MODEL_FILENAME)
    point = load_calibration(version_dir / CALIBRATION_FILENAME).operating_point(point_name)
    out = model.run(pixels)
    return decide(out.logits, out.selection, point, model.class_names)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_digits_test_split_equals_the_service_at_every_point(tmp_path: Path, suffix: str) -> None:
    test = load_digits("test")
    version_dir = sorted(p for p in MODEL_DIR.iterdir() if p.is_dir())[-1]
    names = load_calibration(version_dir / CALIBRATION_FILENAME).names
    for name in names:
        out = tmp_path / f"{name}{suffix}"
        summary = run_predict(
            MODEL_DIR, out, dataset="digits", split="test", operating_point=name, batch_size=97
        )  # a batch size that does not divide 360
        records = read_records(out)
        expected = service_answers(test.x, name)
        assert [r["input"] for r in records] == [str(i) for i in range(len(test.y))]
        assert list(records[0]) == list(COLUMNS)
        assert [r["decision"] for r in records] == [e["decision"] for e in expected]
        for r, e in zip(records, expected, strict=True):
            k = e["class_index"] if e["decision"] == "predict" else e["candidate"]["class_index"]
            assert r["class_index"] == k
            assert r["score_value"] == pytest.approx(e["score_value"], abs=0)
            assert r["threshold"] == e["threshold"] and r["operating_point"] == name
            assert (r["label"], r["candidate"]) == (
                (e["label"], None) if e["decision"] == "predict" else (None, e["candidate"]["label"])
            )
            # an abstention's conformal set, as the service gives it (every format: a list of names)
            want_set = e["candidate"]["prediction_set"]["labels"] if e["decision"] == "abstain" else None
            assert r["prediction_set"] == want_set
            assert r["true_label"] == test.class_names[int(test.y[int(r["input"])])]
        # the summary, worked out from the service's answers
        answered = np.array([e["decision"] == "predict" for e in expected])
        top = np.array([e.get("class_index", e.get("candidate", {}).get("class_index")) for e in expected])
        wrong = top != test.y
        assert summary.images == 360 and summary.errors == 0
        assert summary.answered == int(answered.sum())
        assert summary.coverage == pytest.approx(answered.mean())
        assert summary.selective_risk == pytest.approx(wrong[answered].mean())
        assert summary.accuracy == pytest.approx(1 - wrong.mean())


def write_pngs(root: Path, x: np.ndarray, y: np.ndarray, class_folders: bool) -> list[Path]:
    paths = []
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / str(int(label)) / "nested" if class_folders else root / f"part{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(np.round(img[0] * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_png_folder_equals_the_service_and_records_unreadable_files(tmp_path: Path) -> None:
    test = load_digits("test")
    root = tmp_path / "pngs"
    paths = write_pngs(root, test.x[:50], test.y[:50], class_folders=True)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    out = tmp_path / "d.jsonl"
    summary = run_predict(MODEL_DIR, out, input_path=root, batch_size=8)
    records = {r["input"]: r for r in read_records(out)}
    assert len(records) == 51 and summary.images == 51 and summary.errors == 1
    broken = records[str(Path("3") / "broken.png")]
    assert broken["decision"] == "error" and "not a readable image" in broken["error"]
    model = OnnxModel(sorted(p for p in MODEL_DIR.iterdir() if p.is_dir())[-1] / MODEL_FILENAME)
    pixels = np.stack([image_to_pixels(p, model.input_spec) for p in paths])
    expected = service_answers(pixels, None)
    for path, label, e in zip(paths, test.y[:50], expected, strict=True):
        r = records[str(path.relative_to(root))]
        assert r["decision"] == e["decision"]
        assert r["true_label"] == str(int(label))  # labels from the ImageFolder tree
    assert summary.labelled == 50


def test_fail_fast_stops_and_leaves_the_old_output(tmp_path: Path) -> None:
    root = tmp_path / "pngs"
    test = load_digits("test")
    write_pngs(root, test.x[:4], test.y[:4], class_folders=False)
    (root / "part0" / "a-broken.png").write_bytes(b"nope")
    out = tmp_path / "d.csv"
    out.write_text("previous run\n")
    with pytest.raises(ValueError, match="not a readable image"):
        run_predict(MODEL_DIR, out, input_path=root, fail_fast=True)
    assert out.read_text() == "previous run\n"  # atomic: nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_npz_without_labels(tmp_path: Path) -> None:
    test = load_digits("test")
    np.savez(tmp_path / "x.npz", x=test.x[:20])
    summary = run_predict(MODEL_DIR, tmp_path / "d.jsonl", input_path=tmp_path / "x.npz")
    records = read_records(tmp_path / "d.jsonl")
    assert summary.labelled == 0 and summary.selective_risk is None
    assert all(r["true_label"] is None and r["correct"] is None for r in records)
    assert [r["decision"] for r in records] == [e["decision"] for e in service_answers(test.x[:20], None)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_name": "d.txt"}, "should end with one of .jsonl, .csv, .parquet"),
        ({"operating_point": "coverage-0.5"}, "coverage-0.5"),
        ({"batch_size": 0}, "at least 1"),
    ],
)
def test_bad_arguments_say_what_is_valid(tmp_path: Path, kwargs: dict, message: str) -> None:
    out = tmp_path / kwargs.pop("out_name", "d.jsonl")
    with pytest.raises(ValueError, match=message):
        run_predict(MODEL_DIR, out, dataset="digits", split="test", **kwargs)
    assert not out.exists()


def test_cli_prints_the_summary(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "predict",
            str(MODEL_DIR),
            "--dataset",
            "digits",
            "--split",
            "test",
            "--out",
            str(tmp_path / "d.parquet"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("360 inputs at operating point ")
    assert "selective risk" in done.stdout and f"wrote {tmp_path / 'd.parquet'}" in done.stdout


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_png_folder_in_csv_and_parquet_equals_the_service_upload_path(tmp_path: Path, suffix: str) -> None:
    """The PNG folder in the other two formats, against the service's own upload decoding
    (``serving.validation.decode_image``, what ``POST /predict_image`` runs) and ``decide``."""
    from abstain.serving.http.validation import decode_image

    test = load_digits("test")
    root = tmp_path / "pngs"
    paths = write_pngs(root, test.x[:30], test.y[:30], class_folders=False)
    (root / "part1" / "zz-truncated.png").write_bytes(paths[0].read_bytes()[:40])
    out = tmp_path / f"d{suffix}"
    summary = run_predict(MODEL_DIR, out, input_path=root, batch_size=7)
    records = {r["input"]: r for r in read_records(out)}
    assert len(records) == 31 and summary.errors == 1
    assert records[str(Path("part1") / "zz-truncated.png")]["decision"] == "error"
    model = OnnxModel(sorted(p for p in MODEL_DIR.iterdir() if p.is_dir())[-1] / MODEL_FILENAME)
    uploads = np.concatenate([decode_image(p.read_bytes(), model.input_spec) for p in paths])
    for path, e in zip(paths, service_answers(uploads, None), strict=True):
        r = records[str(path.relative_to(root))]
        assert r["decision"] == e["decision"] and r["score_value"] == e["score_value"]
        k = e["class_index"] if e["decision"] == "predict" else e["candidate"]["class_index"]
        assert r["class_index"] == k and r["true_label"] is None  # no class folders: no labels
