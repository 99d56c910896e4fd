"""``abstain train`` as a user runs it: a real process, torchrun with 2 gloo processes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abstain.training.checkpoint import load_checkpoint

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes on 2 cores: no oversubscription


def test_training_cli_module_does_not_import_torch() -> None:
    code = "import sys, abstain.training.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_invalid_choice_is_a_one_line_error_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "abstain", "train", "--dataset", "mnist", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 2
    expected = "dataset should be one of digits, fashion-mnist, cifar100, imagefolder, but got 'mnist'"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_ddp_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "abstain",
            "train",
            "--dataset",
            "digits",
            "--loss",
            "sync",
            "--width",
            "8",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cpu x2" in result.stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["train_config"]["world_size"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["split"] for x in lines] == ["val", "val", "val", "test"]
    assert lines[-1]["accuracy"] > 0.3  # well above chance (0.1) after three epochs of both halves


def test_cli_defaults_are_the_config_defaults() -> None:
    """``abstain train``'s defaults come from abstain.training.defaults, as TrainConfig's do."""
    import dataclasses

    import typer

    from abstain.training.cli import train
    from abstain.training.config import TrainConfig
    from abstain.training.losses import build_loss

    app = typer.Typer()
    app.command()(train)
    params = {p.name: p.default for p in typer.main.get_command(app).params}
    config = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    shared = sorted(set(params) & set(config) - {"data_root", "pretrained"})
    assert {"alpha", "lam", "beta", "prior", "target_coverage", "weight_decay", "lr_gamma"} <= set(shared)
    for name in shared:
        assert params[name] == config[name], name
    sync = build_loss("sync")
    assert (sync.beta, sync.prior) == (params["beta"], params["prior"])
