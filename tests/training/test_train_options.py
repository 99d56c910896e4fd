"""`abstain train`'s issue-19 options reach the run: cosine schedule, SAT, SWA, channels_last, the
ablation flags."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from abstain.cli import app
from abstain.training.checkpoint import load_checkpoint


def test_options_are_recorded_in_the_checkpoint(tmp_path: Path) -> None:
    args = ["train", "--dataset", "digits", "--width", "4", "--epochs", "2", "--no-progress"]
    args += ["--out", str(tmp_path), "--loss", "sat", "--entropy-weight", "0.01", "--sat-momentum", "0.8"]
    args += [
        "--sat-pretrain-epochs",
        "1",
        "--schedule",
        "cosine",
        "--warmup-epochs",
        "1",
        "--swa-epochs",
        "1",
        "--channels-last",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    config = ckpt["train_config"]
    assert (config["loss"], config["entropy_weight"], config["sat_momentum"]) == ("sat", 0.01, 0.8)
    assert (config["schedule"], config["warmup_epochs"], config["swa_epochs"]) == ("cosine", 1, 1)
    assert config["channels_last"] is True  # off by default on CPU
    assert (
        ckpt["model_config"]["abstain_head"]
        and ckpt["model_config"]["selection_source"] == "softmax_response"
    )
    assert ckpt["swa"]["averaged"] == 1


def test_ablation_flags_reach_the_model_and_the_loss(tmp_path: Path) -> None:
    args = ["train", "--dataset", "digits", "--width", "4", "--epochs", "1", "--no-progress"]
    args += [
        "--out",
        str(tmp_path),
        "--loss",
        "selectivenet",
        "--detach-selection",
        "--no-divide-risk-by-coverage",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["model_config"]["detach_selection"]
    assert ckpt["train_config"]["divide_risk_by_coverage"] is False
