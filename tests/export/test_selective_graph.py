"""`abstain export-selective`: the baked-in decision equals the service's, bit for bit where provable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from abstain.cli import app
from abstain.contract import (
    ACCEPT_NAME,
    CALIBRATION_FILENAME,
    CLASS_INDEX_NAME,
    CONFIDENCE_NAME,
    INPUT_NAME,
    LABELS_FILENAME,
    LOGITS_NAME,
    META_SELECTIVE,
    MODEL_FILENAME,
    SCORES_NAME,
    SELECTION_NAME,
    TRITON_CONFIG_FILENAME,
)
from abstain.export.selective import export_selective
from abstain.export.selective_graph import append_decision, decision_model
from abstain.io import sha256_file
from abstain.operating_points import OperatingPoint, load_calibration
from abstain.selective import selection_scores
from abstain.serving.decisions import PREDICT, decide
from tests.digits import load_digits

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "models" / "digits" / "1"
SHIPPED = ROOT / "models" / "digits-selective"
REGENERATE = "abstain export-selective models/digits --force"


def session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def service_accepts(logits: np.ndarray, selection: np.ndarray, point: OperatingPoint) -> np.ndarray:
    """The embedded service's decision (serving/decisions.py), as a bool [N]."""
    names = [str(k) for k in range(logits.shape[1])]
    return np.array([d["decision"] == PREDICT for d in decide(logits, selection, point, names)])


@pytest.fixture(scope="module")
def calibration():
    return load_calibration(BASE / CALIBRATION_FILENAME)


@pytest.fixture(scope="module")
def test_outputs():
    """The base graph's heads on the digits test split (360 images)."""
    return run(session(onnx.load(BASE / MODEL_FILENAME)), {INPUT_NAME: load_digits("test").x})


def all_score_points(calibration, test_outputs) -> list[OperatingPoint]:
    """The shipped points plus softmax_response / combined points with thresholds *at* test scores."""
    logits, selection = test_outputs[LOGITS_NAME], test_outputs[SELECTION_NAME]
    extra = []
    for score in ("softmax_response", "combined", "selection"):
        values = np.sort(selection_scores(logits, selection, score))
        for q in (0.1, 0.5, 0.9):  # thresholds equal to an image's own float64 score
            extra.append(
                OperatingPoint(f"{score}-{q}", "coverage", score, float(values[int(q * len(values))]))
            )
    return [*calibration.operating_points, *extra]


def test_shipped_operating_points_equal_the_service_on_the_whole_test_split(calibration, test_outputs):
    points = list(calibration.operating_points)
    model = append_decision(onnx.load(BASE / MODEL_FILENAME), points)
    onnx.checker.check_model(model, full_check=True)
    out = run(session(model), {INPUT_NAME: load_digits("test").x})
    # the original outputs are untouched
    np.testing.assert_array_equal(out[LOGITS_NAME], test_outputs[LOGITS_NAME])
    np.testing.assert_array_equal(out[SELECTION_NAME], test_outputs[SELECTION_NAME])
    assert out[ACCEPT_NAME].shape == (360, len(points)) and out[ACCEPT_NAME].dtype == np.bool_
    for j, point in enumerate(points):
        want = service_accepts(out[LOGITS_NAME], out[SELECTION_NAME], point)
        np.testing.assert_array_equal(out[ACCEPT_NAME][:, j], want, err_msg=point.name)
        # the selection score is the float32 head widened to float64: bit-identical
        np.testing.assert_array_equal(out[SCORES_NAME][:, j], out[SELECTION_NAME].astype(np.float64))
    # the shipped points are not trivial: each answers some and abstains on some
    assert 0 < out[ACCEPT_NAME].sum() < out[ACCEPT_NAME].size
    decisions = decide(out[LOGITS_NAME], out[SELECTION_NAME], points[0], [str(k) for k in range(10)])
    np.testing.assert_array_equal(
        out[CLASS_INDEX_NAME],
        [d.get("class_index", d.get("candidate", {}).get("class_index")) for d in decisions],
    )
    np.testing.assert_allclose(out[CONFIDENCE_NAME], [d["confidence"] for d in decisions], rtol=0, atol=1e-15)


def test_every_score_agrees_with_the_service_except_within_float64_ulps_of_the_threshold(
    calibration, test_outputs
):
    """Thresholds set to test images' own float64 scores: the hardest case there is.

    ``selection`` is exact. ``softmax_response``/``combined`` go through ``exp`` and a sum whose
    rounding differs between numpy and ONNX Runtime by a few float64 ulps, so an image whose score
    *is* the threshold may flip (1 of 360 did for ``combined`` when this was written); no image
    more than 4 ulps away from a threshold may.
    """
    points = all_score_points(calibration, test_outputs)
    out = run(
        session(append_decision(onnx.load(BASE / MODEL_FILENAME), points)),
        {INPUT_NAME: load_digits("test").x},
    )
    band = 4 * np.finfo(np.float64).eps
    for j, point in enumerate(points):
        want = selection_scores(out[LOGITS_NAME], out[SELECTION_NAME], point.score)
        np.testing.assert_allclose(out[SCORES_NAME][:, j], want, rtol=0, atol=band)
        differ = out[ACCEPT_NAME][:, j] != service_accepts(out[LOGITS_NAME], out[SELECTION_NAME], point)
        if point.score == "selection":
            assert not differ.any(), point.name
        else:
            assert (np.abs(want[differ] - point.threshold) <= band).all(), point.name


def crafted_selection(threshold: float) -> np.ndarray:
    """float32 g values around a float64 threshold: the float32 nearest below, at/above, and neighbours."""
    t32 = np.float32(threshold)  # rounds to nearest: may be above or below the float64 value
    values = [
        t32,
        np.nextafter(t32, np.float32(-1)),
        np.nextafter(t32, np.float32(2)),
        np.nextafter(np.nextafter(t32, np.float32(-1)), np.float32(-1)),
    ]
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize("threshold", [0.9974579811096191, 0.1, 0.5, 1.0 / 3.0, 0.9999999, 0.0, 1.0])
def test_crafted_selection_scores_at_and_around_the_threshold(threshold):
    point = OperatingPoint("p", "coverage", "selection", threshold)
    g = crafted_selection(threshold)
    logits = np.zeros((g.size, 3), dtype=np.float32)
    out = run(session(decision_model([point], 3)), {LOGITS_NAME: logits, SELECTION_NAME: g})
    want = service_accepts(logits, g, point)
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, 0], want)
    # worked by hand: a float32 value is accepted iff it is >= the float64 threshold
    np.testing.assert_array_equal(want, g.astype(np.float64) >= threshold)
    if float(np.float32(threshold)) == threshold:  # representable: "exactly at" is accepted, below is not
        assert want.tolist()[:3] == [True, False, True]
    else:  # not representable: the float32 neighbours straddle it, one accepted, one not
        assert want.sum() in (1, 2)


def test_crafted_softmax_response_at_a_float64_threshold():
    # logits [0, 0] give softmax response exactly 0.5 in both paths (1 / (1 + 1))
    logits = np.array([[0, 0], [0, -1e-6], [0, 1e-6], [2, 0]], dtype=np.float32)
    for threshold in (0.5, np.nextafter(0.5, 1.0), np.nextafter(0.5, 0.0)):
        points = [
            OperatingPoint("sr", "coverage", "softmax_response", float(threshold)),
            OperatingPoint("cb", "coverage", "combined", float(threshold)),
        ]
        g = np.ones(4, dtype=np.float32)
        out = run(session(decision_model(points, 2)), {LOGITS_NAME: logits, SELECTION_NAME: g})
        for j, point in enumerate(points):
            np.testing.assert_array_equal(out[ACCEPT_NAME][:, j], service_accepts(logits, g, point))
    assert out[CLASS_INDEX_NAME].tolist() == [0, 0, 1, 0]  # ties go to the first class, like numpy


def test_metadata_names_points_in_column_order_and_the_sources(tmp_path, calibration):
    repository = tmp_path / "models"
    shutil.copytree(BASE.parent, repository / "digits")
    result = export_selective(repository / "digits")
    model = onnx.load(result.model_path)
    meta = json.loads({p.key: p.value for p in model.metadata_props}[META_SELECTIVE])
    assert [p["name"] for p in meta["operating_points"]] == calibration.names
    assert [p["threshold"] for p in meta["operating_points"]] == [
        p.threshold for p in calibration.operating_points
    ]
    assert meta["operating_points"][0]["target_coverage"] == 0.8
    assert meta["base_graph_sha256"] == sha256_file(BASE / MODEL_FILENAME) == calibration.graph_sha256
    assert meta["calibration_sha256"] == sha256_file(BASE / CALIBRATION_FILENAME)
    assert [o.name for o in model.graph.output] == [
        LOGITS_NAME,
        SELECTION_NAME,
        CLASS_INDEX_NAME,
        CONFIDENCE_NAME,
        SCORES_NAME,
        ACCEPT_NAME,
    ]
    assert result.model_path == repository / "digits-selective" / "1" / MODEL_FILENAME


def test_shipped_selective_entry_is_what_the_command_makes_from_the_current_calibration(tmp_path):
    if not SHIPPED.is_dir():
        pytest.fail(f"{SHIPPED} is missing: run `{REGENERATE}` in the repository root")
    repository = tmp_path / "models"
    shutil.copytree(BASE.parent, repository / "digits")
    result = export_selective(repository / "digits")
    fresh = result.model_path.parent.parent
    for rel in (f"1/{MODEL_FILENAME}", TRITON_CONFIG_FILENAME, LABELS_FILENAME):
        assert (fresh / rel).read_bytes() == (SHIPPED / rel).read_bytes(), (
            f"models/digits-selective/{rel} is stale (models/digits was re-exported or re-calibrated): "
            f"run `{REGENERATE}` in the repository root and commit the result"
        )


def test_command_is_deterministic_and_refuses_to_overwrite(tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(BASE.parent, repository / "digits")
    runner = CliRunner()
    first = runner.invoke(app, ["export-selective", str(repository / "digits")])
    assert first.exit_code == 0, first.output
    assert "digits-selective" in first.output and "coverage-0.8" in first.output
    path = repository / "digits-selective" / "1" / MODEL_FILENAME
    digest = sha256_file(path)
    again = runner.invoke(app, ["export-selective", str(repository / "digits")])
    assert again.exit_code != 0 and "--force" in str(again.exception)
    forced = runner.invoke(app, ["export-selective", str(repository / "digits/1"), "--force"])
    assert forced.exit_code == 0, forced.output
    assert sha256_file(path) == digest


def test_uncalibrated_or_mismatched_models_are_refused_and_nothing_is_written(tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(BASE.parent, repository / "digits")
    (repository / "digits" / "1" / CALIBRATION_FILENAME).rename(tmp_path / "cal.json")
    with pytest.raises(FileNotFoundError, match="abstain calibrate"):
        export_selective(repository / "digits")
    raw = json.loads((tmp_path / "cal.json").read_text())
    raw["graph_sha256"] = "0" * 64
    (repository / "digits" / "1" / CALIBRATION_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="another graph"):
        export_selective(repository / "digits")
    assert sorted(p.name for p in repository.iterdir()) == ["digits"]


def test_a_selective_graph_cannot_be_made_selective_again(calibration):
    model = append_decision(onnx.load(BASE / MODEL_FILENAME), calibration.operating_points)
    with pytest.raises(ValueError, match="selective graph already"):
        append_decision(model, calibration.operating_points)
    with pytest.raises(ValueError, match="at least one operating point"):
        decision_model([], 10)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_older_opsets_get_the_same_decision(opset):
    points = [
        OperatingPoint("g", "coverage", "selection", 0.5),
        OperatingPoint("sr", "coverage", "softmax_response", 0.6),
        OperatingPoint("cb", "coverage", "combined", 0.55),
    ]
    rng = np.random.default_rng(opset)
    feeds = {
        LOGITS_NAME: rng.normal(size=(50, 4)).astype(np.float32),
        SELECTION_NAME: rng.random(50, dtype=np.float32),
    }
    model = decision_model(points, 4, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    out = run(session(model), feeds)
    for j, point in enumerate(points):
        np.testing.assert_array_equal(
            out[ACCEPT_NAME][:, j], service_accepts(feeds[LOGITS_NAME], feeds[SELECTION_NAME], point)
        )


def test_a_base_graph_older_than_opset_13_is_refused(calibration):
    base = onnx.load(BASE / MODEL_FILENAME)
    del base.opset_import[:]
    base.opset_import.add(domain="", version=12)
    with pytest.raises(ValueError, match="opset >= 13"):
        append_decision(base, calibration.operating_points)
