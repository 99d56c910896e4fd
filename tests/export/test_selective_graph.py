"""The selective graph (``abstain export-selective``): its decision equals the service's, exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from abstain.cli import app
from abstain.contract import (
    ACCEPT_NAME,
    CLASS_INDEX_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    META_SELECTIVE,
    SCORES_NAME,
    SELECTION_NAME,
)
from abstain.export.selective_entry import export_selective_entry
from abstain.export.selective_graph import SelectiveInfo, build_selective_model, point_records
from abstain.io import sha256_file
from abstain.operating_points import Calibration, OperatingPoint, load_calibration
from tests.answer_helpers import decide
from tests.digits import load_digits

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"
SHIPPED = REPO / "models" / "digits-selective"
REGENERATE = "abstain export-selective models/digits --force"


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: x}), strict=True))


def _service(
    logits: np.ndarray, selection: np.ndarray, points: tuple[OperatingPoint, ...], names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accept [N, P], class_index [N], score_value [N, P]) as `abstain serve` decides them."""
    per_point = [decide(logits, selection, p, names) for p in points]
    accept = np.array([[d["decision"] == "predict" for d in col] for col in per_point]).T
    scores = np.array([[d["score_value"] for d in col] for col in per_point]).T
    index = np.array([d.get("class_index", d.get("candidate", {}).get("class_index")) for d in per_point[0]])
    return accept, index, scores


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the command writes today from models/digits, in a scratch repository."""
    repo = tmp_path_factory.mktemp("models")
    shutil.copytree(DIGITS, repo / "digits")
    export_selective_entry(repo / "digits")
    return repo / "digits-selective"


def test_shipped_entry_is_what_the_command_makes_from_the_current_calibration(built: Path) -> None:
    for rel in ("1/model.onnx", "config.pbtxt", "labels.txt"):
        assert (SHIPPED / rel).read_bytes() == (built / rel).read_bytes(), (
            f"models/digits-selective/{rel} is stale (models/digits or its calibration changed): "
            f"run `{REGENERATE}` and commit the result"
        )


def test_metadata_names_points_in_order_with_provenance(built: Path) -> None:
    model = onnx.load(str(built / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    info = json.loads({p.key: p.value for p in model.metadata_props}[META_SELECTIVE])
    calibration = load_calibration(DIGITS / "1" / "calibration.json")
    assert [p["name"] for p in info["operating_points"]] == calibration.names
    assert [p["threshold"] for p in info["operating_points"]] == [
        p.threshold for p in calibration.operating_points
    ]
    assert info["operating_points"][0]["target_coverage"] == calibration.operating_points[0].target_coverage
    assert info["base_graph_sha256"] == sha256_file(DIGITS / "1" / "model.onnx")
    assert info["calibration_sha256"] == sha256_file(DIGITS / "1" / "calibration.json")
    assert info["default_operating_point"] == calibration.default_operating_point
    # the thresholds sit in the graph as float64, bit for bit
    (t,) = [i for i in model.graph.initializer if i.name.endswith("thresholds")]
    assert numpy_helper.to_array(t).tolist() == [p.threshold for p in calibration.operating_points]


def test_decisions_equal_the_service_on_the_whole_digits_test_split(built: Path) -> None:
    x = load_digits("test").x
    calibration = load_calibration(DIGITS / "1" / "calibration.json")
    names = (DIGITS / "labels.txt").read_text().split()
    base = _run(_session(DIGITS / "1" / "model.onnx"), x)
    out = _run(_session(built / "1" / "model.onnx"), x)
    # the base outputs pass through untouched
    np.testing.assert_array_equal(out[LOGITS_NAME], base[LOGITS_NAME])
    np.testing.assert_array_equal(out[SELECTION_NAME], base[SELECTION_NAME])
    accept, index, scores = _service(
        base[LOGITS_NAME], base[SELECTION_NAME], calibration.operating_points, names
    )
    assert out[ACCEPT_NAME].dtype == np.bool_ and out[ACCEPT_NAME].shape == (len(x), 4)
    np.testing.assert_array_equal(out[ACCEPT_NAME], accept)
    np.testing.assert_array_equal(out[CLASS_INDEX_NAME], index)
    for j, point in enumerate(calibration.operating_points):
        if point.score == "selection":  # bit-exact
            np.testing.assert_array_equal(out[SCORES_NAME][:, j], scores[:, j])
        else:  # the softmax scores within a few float64 ulps (module docstring); the shipped
            # calibration's score is chosen on val (issue 10): the softmax response here
            np.testing.assert_allclose(out[SCORES_NAME][:, j], scores[:, j], rtol=0, atol=1e-15)
    # not a vacuous comparison: the points split the test set differently
    assert 0 < accept[:, 0].sum() < accept[:, -1].sum() <= len(x)


# --- crafted scores at, just above and just below each threshold ------------------------

K = 3


def _passthrough_base() -> onnx.ModelProto:
    """A base graph whose outputs are its input: pixels [N, K + 1] → logits [N, K], selection [N]."""
    nodes = [
        helper.make_node("Slice", [INPUT_NAME, "s0", "sK", "ax"], [LOGITS_NAME]),
        helper.make_node("Slice", [INPUT_NAME, "sK", "sK1", "ax"], ["g2"]),
        helper.make_node("Reshape", ["g2", "flat"], [SELECTION_NAME]),
    ]
    inits = [
        numpy_helper.from_array(np.array([v], dtype=np.int64), n)
        for n, v in (("s0", 0), ("sK", K), ("sK1", K + 1), ("ax", 1), ("flat", -1))
    ]
    graph = helper.make_graph(
        nodes,
        "passthrough",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", K + 1])],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", K]),
            helper.make_tensor_value_info(SELECTION_NAME, TensorProto.FLOAT, ["batch"]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _selective(points: list[OperatingPoint]) -> ort.InferenceSession:
    calibration = Calibration(
        graph_sha256="0" * 64, operating_points=tuple(points), default_operating_point=points[0].name
    )
    info = SelectiveInfo("0" * 64, "0" * 64, points[0].name, point_records(calibration))
    return _session(build_selective_model(_passthrough_base(), calibration, info))


def _neighbours32(t: float) -> np.ndarray:
    """float32 selections around a float64 threshold t: the float32 nearest t, and one ulp either side."""
    t32 = np.float32(t)
    return np.array(
        [np.nextafter(t32, np.float32(-1)), t32, np.nextafter(t32, np.float32(2))], dtype=np.float32
    )


@pytest.mark.parametrize(
    "threshold",
    [
        *[p.threshold for p in load_calibration(DIGITS / "1" / "calibration.json").operating_points],
        0.5,  # exactly representable in both
        0.1,  # not a float32: the float32 neighbours straddle it
        float(np.float32(0.7)) + 1e-12,  # just above a float32: that float32 must abstain
    ],
)
def test_selection_score_at_and_around_the_threshold(threshold: float) -> None:
    points = [OperatingPoint(name="p", method="coverage", score="selection", threshold=threshold)]
    g = _neighbours32(threshold)
    logits = np.tile(np.array([[1.0, 0.0, -1.0]], dtype=np.float32), (len(g), 1))
    out = _run(_selective(points), np.c_[logits, g].astype(np.float32))
    accept, _, _ = _service(logits, g, tuple(points), ["a", "b", "c"])
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, 0], accept[:, 0])
    # the middle one is exactly at t iff t is a float32; above t is accepted, below t is not
    expected = np.float64(g) >= threshold
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, 0], expected)
    if float(np.float32(threshold)) == threshold:
        assert expected.tolist() == [False, True, True]


@pytest.mark.parametrize("score", ["softmax_response", "combined", "margin", "gini"])
def test_softmax_scores_agree_to_an_ulp_and_decide_alike_off_the_threshold(score: str) -> None:
    """The float64 softmax of ONNX Runtime and numpy's differ by at most an ulp or two (their
    ``exp`` differ), so: scores agree to 1e-15 relative; with thresholds 1e-12 (relative) either
    side of an input's score the decision is the service's; exactly *at* the service's score it
    is the service's wherever the two scores are bit-equal (documented in selective_graph.py)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(200, K)).astype(np.float32)
    g = rng.uniform(0, 1, size=200).astype(np.float32)
    probe = OperatingPoint(name="probe", method="coverage", score=score, threshold=0.0)
    _, _, values = _service(logits, g, (probe,), ["a", "b", "c"])
    off, at = [], []
    for i, v in enumerate(values[:20, 0]):
        off += [
            OperatingPoint(name=f"lo{i}", method="coverage", score=score, threshold=float(v * (1 - 1e-12))),
            OperatingPoint(name=f"hi{i}", method="coverage", score=score, threshold=float(v * (1 + 1e-12))),
        ]
        at.append(OperatingPoint(name=f"at{i}", method="coverage", score=score, threshold=float(v)))
    out = _run(_selective(off + at), np.c_[logits, g].astype(np.float32))
    accept, _, scores = _service(logits, g, tuple(off + at), ["a", "b", "c"])
    np.testing.assert_allclose(out[SCORES_NAME], scores, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, : len(off)], accept[:, : len(off)])
    same = out[SCORES_NAME][:, len(off) :] == scores[:, len(off) :]
    assert same.mean() > 0.5  # most scores are bit-equal, so the check below is not vacuous
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, len(off) :][same], accept[:, len(off) :][same])
    assert accept[:, len(off) :].any() and not accept[:, len(off) :].all()


def test_cli_refuses_an_uncalibrated_graph_and_an_existing_version(tmp_path: Path) -> None:
    shutil.copytree(DIGITS, tmp_path / "digits")
    runner = CliRunner()
    ok = runner.invoke(app, ["export-selective", str(tmp_path / "digits"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["operating_points"][0] == "coverage-0.8"
    again = runner.invoke(app, ["export-selective", str(tmp_path / "digits")])
    assert again.exit_code == 2 and "--force" in again.output
    (tmp_path / "digits" / "1" / "calibration.json").unlink()
    missing = runner.invoke(app, ["export-selective", str(tmp_path / "digits"), "--name", "x"])
    assert missing.exit_code == 2 and "abstain calibrate" in missing.output
    assert not (tmp_path / "x").exists()


def test_selective_graph_on_a_saturated_g_thresholds_its_logit() -> None:
    """Issue 10: a base graph with selection_logit decides on z, as the service does."""
    from abstain.contract import SCORE_SCALE_LOGIT
    from tests.graph_factory import build_graph

    base = onnx.load_from_string(build_graph(selection_logit=True, logit_shift=20.0))
    x = load_digits("test").x
    plain = _session(base)
    logits, g, z = plain.run(None, {INPUT_NAME: x})
    assert (g == 1.0).all()  # g alone cannot tell these images apart
    point = OperatingPoint(
        name="p",
        method="coverage",
        score="selection",
        threshold=float(np.median(z)),
        extra={"score_scale": SCORE_SCALE_LOGIT},
    )
    calibration = Calibration(graph_sha256="0" * 64, operating_points=(point,), default_operating_point="p")
    info = SelectiveInfo("0" * 64, "0" * 64, "p", point_records(calibration))
    out = _run(_session(build_selective_model(base, calibration, info)), x)
    service = decide(logits, g, point, [str(i) for i in range(10)], selection_logit=z)
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, 0], [d["decision"] == "predict" for d in service])
    np.testing.assert_array_equal(out[ACCEPT_NAME][:, 0], np.float64(z) >= point.threshold)
    # a probability-scale calibration on this graph is refused, as combined is
    legacy = Calibration(
        graph_sha256="0" * 64,
        default_operating_point="p",
        operating_points=(OperatingPoint(name="p", method="coverage", score="selection", threshold=0.5),),
    )
    with pytest.raises(ValueError, match="probability scale"):
        build_selective_model(base, legacy, info)
