"""``Selector`` in-process, without Ray: the service's decisions for every way a batch carries its
images, an error row (and the rest decided) for each bad record, the graph checked on load."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from abstain.calibration.predict import COLUMNS, run_predict
from abstain.calibration.selector import EntryFiles, Selector, records_to_columns
from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME
from abstain.datasets import load_digits
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel
from tests.answer_helpers import decide

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "digits"
VERSION_DIR = MODEL_DIR / "1"


@pytest.fixture(scope="module")
def selector() -> Selector:
    return Selector(MODEL_DIR, "coverage-0.9")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    split = load_digits("test")
    return split.x[:40], split.y[:40]


def service(x: np.ndarray, point: str = "coverage-0.9") -> list[dict]:
    model = OnnxModel(VERSION_DIR / MODEL_FILENAME)
    out = model.run(x)
    calibration = load_calibration(VERSION_DIR / CALIBRATION_FILENAME)
    return decide(out.logits, out.selection, calibration.operating_point(point), model.class_names)


def png(gray: np.ndarray) -> bytes:
    """An 8-bit PNG of one ``[1, H, W]`` image in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray((gray[0] * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pixels_are_decided_as_the_service_decides(selector, digits) -> None:
    x, y = digits
    out = selector({"pixels": x, "label": y})
    assert list(out) == list(COLUMNS)
    expected = service(x)
    assert list(out["decision"]) == [e["decision"] for e in expected]
    assert "abstain" in set(out["decision"]) and "predict" in set(out["decision"])
    assert np.array_equal(out["score_value"].astype(float), [e["score_value"] for e in expected])
    assert list(out["correct"]) == [bool(k == t) for k, t in zip(out["class_index"], y, strict=True)]
    assert list(out["input"]) == [str(i) for i in range(len(y))]


def test_uint8_pixels_are_scaled_and_flat_rows_reshaped(selector, digits) -> None:
    x, _ = digits
    as_uint8 = (x * 255).round().astype(np.uint8)
    flat = selector({"pixels": as_uint8.reshape(len(x), -1)})
    expected = service(as_uint8.astype(np.float32) / 255)
    assert list(flat["decision"]) == [e["decision"] for e in expected]


def test_each_bad_record_is_an_error_row_and_the_rest_are_decided(selector, digits) -> None:
    x, y = digits
    rows = [x[0], x[1].copy(), x[2] * 2, x[3][:, :4], x[4]]
    rows[1][0, 0, 0] = np.nan
    labels = np.array([y[0], y[1], y[2], y[3], 99])
    column = np.empty(len(rows), dtype=object)  # one array per row, as Ray gives a ragged column
    for i, row in enumerate(rows):
        column[i] = row
    out = selector({"pixels": column, "label": labels})
    assert list(out["decision"][1:]) == ["error"] * 4
    errors = list(out["error"])
    assert "NaN" in errors[1] and "[0, 2]" in errors[2] and "[1, 8, 8]" in errors[3]
    assert "label 99 is not a class index in [0, 10)" in errors[4]
    assert out["decision"][0] == service(x[:1])[0]["decision"]


def test_encoded_files_decoded_images_and_paths_give_the_same_decisions(selector, digits, tmp_path) -> None:
    x, _ = digits
    files = [png(image) for image in x[:10]]
    from_bytes = selector({"bytes": np.array([*files, b"not an image"], dtype=object)})
    decoded = [np.asarray(Image.open(io.BytesIO(f))) for f in files]
    from_images = selector({"image": np.array(decoded)})
    for i, data in enumerate(files):
        (tmp_path / f"{i}.png").write_bytes(data)
    paths = [str(tmp_path / f"{i}.png") for i in range(10)] + [str(tmp_path / "gone.png")]
    from_paths = Selector(MODEL_DIR, "coverage-0.9", folder_root=str(tmp_path))({"path": np.array(paths)})
    assert (
        list(from_bytes["decision"][:10])
        == list(from_images["decision"])
        == list(from_paths["decision"][:10])
    )
    assert "not a readable image" in from_bytes["error"][10]
    assert (
        from_paths["decision"][10] == "error" and "gone.png: cannot read the file" in from_paths["error"][10]
    )
    assert list(from_paths["input"][:2]) == ["0.png", "1.png"]


def test_a_batch_without_images_is_the_pipelines_error(selector) -> None:
    with pytest.raises(ValueError, match="exactly one of the columns bytes, image, pixels"):
        selector({"label": np.array([1, 2])})


def test_a_graph_that_is_not_the_calibrated_one_is_refused() -> None:
    entry = EntryFiles.read(MODEL_DIR)
    calibration = json.loads(entry.calibration)
    calibration["graph_sha256"] = "0" * 64
    tampered = EntryFiles(entry.graph, json.dumps(calibration).encode(), entry.where)
    with pytest.raises(ValueError, match="sha256"):
        Selector(tampered)


def test_records_to_columns_types_the_columns_that_have_no_none() -> None:
    columns = records_to_columns(
        [
            dict.fromkeys(COLUMNS) | {"class_index": 3, "confidence": 0.5},
            dict.fromkeys(COLUMNS) | {"class_index": 4},
        ]
    )
    assert columns["class_index"].dtype == np.int64 and columns["confidence"].dtype == object


def test_plain_predict_on_parquet_equals_the_npz(tmp_path, digits) -> None:
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x, y=y)
    table = pa.table({"pixels": pa.array(list(x.reshape(len(x), -1))), "label": pa.array(y)})
    pq.write_table(table, tmp_path / "d.parquet")
    from_npz = run_predict(MODEL_DIR, tmp_path / "a.jsonl", input_path=tmp_path / "d.npz", batch_size=16)
    from_parquet = run_predict(
        MODEL_DIR, tmp_path / "b.jsonl", input_path=tmp_path / "d.parquet", batch_size=16
    )
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert from_parquet.images == 40 and from_parquet.answered == from_npz.answered
