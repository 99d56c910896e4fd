"""``abstain calibrate`` end to end on a throwaway linear digits graph (tests/graph_factory.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abstain.bounds import binomial_tail_p_value, risk_exceeds_target
from abstain.calibration.calibrate import DEFAULT_RISK_METHOD, predict, run_calibration
from abstain.calibration.data_sources import image_to_pixels
from abstain.calibration.evaluate import run_evaluation
from abstain.contract import DEFAULT_CANDIDATE_SCORES
from abstain.datasets import load_digits
from abstain.io import sha256_file
from abstain.operating_points import load_calibration
from abstain.risk_coverage import aurc, coverage_and_risk
from abstain.runtime import OnnxModel
from abstain.thresholds import RankedScores, ltt_start_count
from tests.graph_factory import write_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits graph that records the digits train split as its training data."""
    train_fingerprint = load_digits("train").fingerprint
    return write_model_dir(tmp_path_factory.mktemp("repo"), train_fingerprint=train_fingerprint)


@pytest.fixture(scope="module")
def calibrated(version_dir: Path):
    return run_calibration(
        version_dir.parent,
        dataset="digits",
        split="val",
        coverages=[0.8, 0.9, 0.95],
        risks=[0.2, 0.001],
        delta=0.05,
        risk_method="sgr",
    )


def test_calibration_file_binds_graph_data_and_thresholds(version_dir: Path, calibrated) -> None:
    cal = load_calibration(version_dir / "calibration.json")
    val = load_digits("val")
    assert cal.graph_sha256 == sha256_file(version_dir / "model.onnx")
    assert cal.data["fingerprint"] == val.fingerprint and cal.data["size"] == 359
    assert cal.names == ["coverage-0.8", "coverage-0.9", "coverage-0.95", "risk-0.2"]
    assert cal.default_operating_point == "coverage-0.9"
    # the score with the lowest AURC on the calibration data was chosen, for every point
    model = OnnxModel(version_dir / "model.onnx")
    preds = predict(model, val)
    aurcs = {name: aurc(preds.scores(name), preds.errors) for name in cal.scores}
    assert calibrated.chosen_score == min(aurcs, key=aurcs.get)
    assert {p.score for p in cal.operating_points} == {calibrated.chosen_score}
    assert cal.scores[calibrated.chosen_score]["aurc"] == pytest.approx(aurcs[calibrated.chosen_score])
    # every written threshold reproduces the measured coverage and risk on the same data
    for point in cal.operating_points:
        cov, risk, n_sel = coverage_and_risk(preds.scores(point.score), preds.errors, point.threshold)
        assert (cov, risk, n_sel) == (
            pytest.approx(point.coverage),
            pytest.approx(point.risk),
            point.extra["n_selected"],
        )
        if point.method == "coverage":
            lo, hi = point.extra["coverage_interval"]
            assert point.target_coverage <= cov and lo < cov < hi
            # one fewer sample answered would drop below the target: the largest such threshold
            assert (n_sel - 1) / 359 < point.target_coverage
        else:
            assert risk <= point.extra["risk_bound"] <= 0.2


def test_unmet_risk_target_reports_samples_needed(calibrated) -> None:
    (unmet,) = calibrated.calibration.unmet_targets
    assert unmet["name"] == "risk-0.001" and "threshold" not in unmet
    # zero errors among m answered: 1 - (δ/K)^(1/m) <= 0.001
    expected = math.ceil(math.log(unmet["delta_per_probe"]) / math.log1p(-0.001))
    assert unmet["samples_needed"] == expected > 359


def test_training_split_is_refused_and_old_file_kept(version_dir: Path, calibrated) -> None:
    before = (version_dir / "calibration.json").read_bytes()
    with pytest.raises(ValueError, match="is the graph's training data"):
        run_calibration(version_dir, dataset="digits", split="train")
    assert (version_dir / "calibration.json").read_bytes() == before


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coverages": [1.5]}, r"coverage targets should be in \(0, 1\], but got 1.5"),
        ({"coverages": [], "risks": [0.0]}, r"risk targets should be in \(0, 1\], but got 0.0"),
        ({"coverages": [0.9, 0.9]}, "should be distinct"),
        ({"delta": 1.0}, r"delta should be in \(0, 1\)"),
        ({"score": "entropy"}, "score should be one of selection, softmax_response, combined"),
        ({"candidate_scores": ["margin", "entropy"]}, "candidate scores should be distinct names from"),
        ({"candidate_scores": []}, "at least one, but got none"),
        ({"candidate_scores": ["gini", "gini"]}, "but got gini, gini"),
    ],
)
def test_bad_arguments(version_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_calibration(version_dir, dataset="digits", split="val", **kwargs)


def test_bad_data(version_dir: Path, tmp_path: Path) -> None:
    val = load_digits("val")
    bad_labels = val.y.copy()
    bad_labels[3] = 10
    with pytest.raises(ValueError, match=r"labels should be class indices in \[0, 10\).*\[10\]"):
        run_calibration(version_dir, data=_npz(tmp_path / "labels.npz", val.x, bad_labels))
    nan_x = val.x.copy()
    nan_x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_calibration(version_dir, data=_npz(tmp_path / "nan.npz", nan_x, val.y))
    with pytest.raises(ValueError, match=r"shape \[N, 1, 8, 8\].*but got \[359, 1, 16, 16\]"):
        run_calibration(version_dir, data=_npz(tmp_path / "shape.npz", np.zeros((359, 1, 16, 16)), val.y))
    with pytest.raises(ValueError, match="too few samples to calibrate \\(10\\); give at least 30"):
        run_calibration(version_dir, data=_npz(tmp_path / "few.npz", val.x[:10], val.y[:10]))
    with pytest.raises(ValueError, match="give exactly one data source"):
        run_calibration(version_dir)
    with pytest.raises(FileNotFoundError, match=r"no such \.npz file"):
        run_calibration(version_dir, data=tmp_path / "absent.npz")


def test_image_folder_is_converted_to_the_graph_spec(tmp_path: Path) -> None:
    from PIL import Image

    from abstain.contract import InputSpec

    spec = InputSpec(3, 16, 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    version = write_model_dir(tmp_path / "models", spec=spec)
    val = load_digits("val")
    folder = tmp_path / "images"
    for i in range(40):
        label_dir = folder / str(val.y[i])
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(val.x[i, 0] * 255).astype(np.uint8), "L").save(label_dir / f"{i}.png")
    run = run_calibration(version, data=folder, coverages=[0.9])
    assert run.n == 40 and run.calibration.data["source"] == str(folder)
    pixels = image_to_pixels(folder / str(val.y[0]) / "0.png", spec)
    assert pixels.shape == (3, 16, 16) and np.array_equal(pixels[0], pixels[2])


def test_cli_writes_calibration_and_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    version = write_model_dir(tmp_path / "models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "calibrate",
            str(version.parent),
            "--dataset",
            "digits",
            "--split",
            "val",
            "--coverage",
            "0.85,0.9",
            "--risk",
            "0.3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout
    assert json.loads((version / "calibration.json").read_text())["default_operating_point"] == "coverage-0.9"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "abstain",
            "calibrate",
            str(version.parent),
            "--dataset",
            "digits",
            "--coverage",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "coverage targets should be in (0, 1], but got 0.0" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_automatic_score_choice_splits_delta_over_the_candidate_scores(
    version_dir: Path, calibrated, tmp_path: Path
) -> None:
    # the score is chosen on the calibration data itself, so each candidate's SGR gets δ/3;
    # its probes then split that again: δ/3/K per probe
    assert calibrated.calibration.data["score_choice"] == "lowest AURC"
    assert calibrated.calibration.data["delta_per_score"] == pytest.approx(
        0.05 / len(DEFAULT_CANDIDATE_SCORES)
    )
    assert calibrated.calibration.data["candidate_scores"] == list(DEFAULT_CANDIDATE_SCORES)
    assert set(calibrated.calibration.scores) == set(DEFAULT_CANDIDATE_SCORES)  # post-hoc ones opt-in
    risk_points = [p.extra for p in calibrated.calibration.operating_points if p.method == "risk"]
    risk_points += list(calibrated.calibration.unmet_targets)
    assert len(risk_points) == 2
    for extra in risk_points:
        assert extra["delta_per_score"] == pytest.approx(0.05 / 3)
        assert extra["delta_per_probe"] == pytest.approx(0.05 / 3 / extra["n_probes"])
    # with --score given there is no choice to pay for: δ/K per probe
    copy = shutil.copytree(version_dir.parent, tmp_path / version_dir.parent.name) / version_dir.name
    named = run_calibration(
        copy,
        dataset="digits",
        split="val",
        coverages=[],
        risks=[0.2],
        delta=0.05,
        score=calibrated.chosen_score,
        risk_method="sgr",
    )
    (point,) = named.calibration.operating_points
    assert named.calibration.data["score_choice"] == "given"
    assert point.extra["delta_per_score"] == pytest.approx(0.05)
    assert point.extra["delta_per_probe"] == pytest.approx(0.05 / point.extra["n_probes"])


def test_post_hoc_candidates_are_chosen_among_and_each_pays_its_share_of_delta(
    version_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(version_dir.parent, tmp_path / version_dir.parent.name) / version_dir.name
    run = run_calibration(
        copy, dataset="digits", split="val", coverages=[0.9], risks=[0.2], delta=0.05,
        candidate_scores=["softmax_response", "margin", "gini"],
    )  # fmt: skip
    data, scores = run.calibration.data, run.calibration.scores
    assert data["candidate_scores"] == ["softmax_response", "margin", "gini"]
    assert data["delta_per_score"] == pytest.approx(0.05 / 3)
    # every candidate measured on the same data; the lowest AURC among them (not g) is chosen
    preds = predict(OnnxModel(copy / "model.onnx"), load_digits("val"))
    for name in ("margin", "gini"):
        assert scores[name]["aurc"] == pytest.approx(aurc(preds.scores(name), preds.errors))
    assert run.chosen_score == min(data["candidate_scores"], key=lambda n: scores[n]["aurc"])
    assert {p.score for p in run.calibration.operating_points} == {run.chosen_score}
    # the chosen score's point answers, on its data, what its threshold says
    (point,) = [p for p in run.calibration.operating_points if p.method == "coverage"]
    expected = coverage_and_risk(preds.scores(point.score), preds.errors, point.threshold)[0]
    assert point.coverage == pytest.approx(expected)


def test_cli_default_candidates_are_the_contract_default() -> None:
    import inspect

    from abstain.calibration.cli import calibrate

    default = inspect.signature(calibrate).parameters["scores"].default
    assert tuple(default.split(",")) == DEFAULT_CANDIDATE_SCORES


@pytest.fixture(scope="module")
def ltt_calibrated(version_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same graph and data as ``calibrated``, risk points by Learn then Test."""
    copy = shutil.copytree(version_dir.parent, tmp_path_factory.mktemp("ltt") / version_dir.parent.name)
    return run_calibration(
        copy / version_dir.name,
        dataset="digits",
        split="val",
        coverages=[0.9],
        risks=[0.2, 0.001],
        delta=0.05,
        risk_method="ltt",
    )


def test_ltt_point_records_a_certificate_that_the_data_reproduces(version_dir: Path, ltt_calibrated) -> None:
    cal = load_calibration(ltt_calibrated.path)
    point = cal.operating_point("risk-0.2")
    extra = point.extra
    assert point.method == "risk" and extra["risk_method"] == "ltt" and extra["p_value_method"] == "exact"
    # the score was chosen on this data: each candidate's test runs at δ/3, as SGR's does
    assert extra["delta_per_score"] == pytest.approx(0.05 / 3) and point.delta == 0.05
    assert extra["start_rule"] == "min_selected"
    # (1 - 0.2)^m <= δ/3: m >= ln(1/60) / ln(0.8) = 18.3; 0.8^19 = 0.0144 <= 1/60 < 0.8^18 = 0.0180
    assert extra["start_min_selected"] == ltt_start_count(0.2, 0.05 / 3) == 19
    preds = predict(OnnxModel(version_dir / "model.onnx"), load_digits("val"))
    scores = preds.scores(point.score)
    answered = scores >= point.threshold
    n_sel, n_err = int(answered.sum()), int(preds.errors[answered].sum())
    assert (n_sel, n_err) == (extra["n_selected"], extra["n_errors"]) and n_sel >= 19
    # the p-value written is the exact binomial tail of those counts, and it rejects at δ/3
    assert extra["p_value"] == pytest.approx(binomial_tail_p_value(n_err, n_sel, 0.2))
    assert extra["p_value"] <= extra["delta_per_score"]
    # fixed sequence: every threshold from the start down to this one rejects, the next one not
    ranked = RankedScores.from_arrays(scores, preds.errors)
    tested = (ranked.n_selected >= 19) & (ranked.thresholds >= point.threshold)
    assert extra["n_tested"] == int(tested.sum()) + (n_sel < 359)
    assert all(
        binomial_tail_p_value(int(k), int(m), 0.2) <= extra["delta_per_score"]
        for k, m in zip(ranked.n_errors[tested], ranked.n_selected[tested], strict=True)
    )
    j = int(np.flatnonzero(ranked.thresholds == point.threshold)[0])
    if n_sel < 359:
        nxt = binomial_tail_p_value(int(ranked.n_errors[j + 1]), int(ranked.n_selected[j + 1]), 0.2)
        assert nxt > extra["delta_per_score"]


def test_ltt_unmet_target_says_how_many_samples_it_needs(ltt_calibrated) -> None:
    (unmet,) = ltt_calibrated.calibration.unmet_targets
    assert unmet["name"] == "risk-0.001" and unmet["risk_method"] == "ltt" and "threshold" not in unmet
    # (1 - 0.001)^m <= δ/3: m >= ln(1/60) / ln(0.999) = 4092.3
    assert unmet["samples_needed"] == ltt_start_count(0.001, 0.05 / 3) == 4093 > 359
    assert unmet["reason"].startswith("fewer than 4093 samples (359)")


def test_an_ltt_point_is_evaluated_and_served_like_any_risk_point(ltt_calibrated, tmp_path: Path) -> None:
    """evaluate, the service's start-up check and the decision read only score and threshold."""
    from abstain.decisions import decide_arrays
    from abstain.serving.inference.artifacts import load_artifacts

    version = ltt_calibrated.path.parent
    report = run_evaluation(version, tmp_path, dataset="digits", split="test").report
    (row,) = [r for r in report["operating_points"] if r["name"] == "risk-0.2"]
    assert row["check"] == "risk not shown above target" and row["test_delta"] == 0.05
    n_err = round(row["selective_risk"] * row["n_selected"])
    assert row["check_passed"] == (not risk_exceeds_target(n_err, row["n_selected"], 0.2, 0.05))
    artifacts = load_artifacts(version, operating_point="risk-0.2")
    point = artifacts.calibration.operating_point("risk-0.2")
    out = OnnxModel(version / "model.onnx").run(load_digits("test").x)
    decided = decide_arrays(out.logits, out.selection, point, out.selection_logit)
    assert decided.answered.mean() == pytest.approx(row["realized_coverage"])


def test_default_risk_method_and_bad_method_or_p_value(version_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(version_dir.parent, tmp_path / version_dir.parent.name) / version_dir.name
    run = run_calibration(copy, dataset="digits", split="val", coverages=[], risks=[0.2])
    (point,) = run.calibration.operating_points
    assert point.extra["risk_method"] == DEFAULT_RISK_METHOD
    with pytest.raises(ValueError, match="risk method should be one of sgr, ltt, but got 'crc'"):
        run_calibration(copy, dataset="digits", split="val", risks=[0.2], risk_method="crc")
    with pytest.raises(ValueError, match="p-value should be one of exact, hoeffding_bentkus, but got 'hb'"):
        run_calibration(copy, dataset="digits", split="val", risks=[0.2], p_value="hb")


def test_cli_method_and_p_value_options(tmp_path: Path) -> None:
    version = write_model_dir(tmp_path / "models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "abstain", "calibrate", str(version.parent), "--dataset", "digits"]
    ok = subprocess.run(
        [*command, "--risk", "0.3", "--method", "ltt", "--p-value", "hoeffding_bentkus"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "LTT p = " in ok.stdout
    (point,) = json.loads((version / "calibration.json").read_text())["operating_points"]
    assert (point["risk_method"], point["p_value_method"]) == ("ltt", "hoeffding_bentkus")
    bad = subprocess.run(
        [*command, "--risk", "0.3", "--method", "crc"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "risk method should be one of sgr, ltt, but got 'crc'" in bad.stderr
