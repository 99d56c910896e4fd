"""Stochastic weight averaging: the average of per-epoch weights, and BatchNorm re-estimated."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from abstain.training.checkpoint import load_checkpoint, model_from_checkpoint
from abstain.training.config import TrainConfig
from abstain.training.loop import run_training
from abstain.training.swa import WeightAverage


def test_average_of_three_snapshots_by_hand_and_bn_statistics_recomputed() -> None:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    average = WeightAverage(model)
    for w in (1.0, 2.0, 6.0):  # the weights at the end of three epochs
        with torch.no_grad():
            model[0].weight.fill_(w)
        average.update(model)
    assert average.count == 3
    # data x = [1, 2, 3, 4] in one batch; averaged weight (1 + 2 + 6)/3 = 3 → activations 3x = [3, 6, 9, 12]
    loader = DataLoader(
        TensorDataset(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.zeros(4)), batch_size=4
    )
    averaged = average.finalize(loader, torch.device("cpu"))
    assert averaged[0].weight.item() == pytest.approx(3.0)
    bn = averaged[1]
    assert bn.running_mean.item() == pytest.approx(7.5)  # mean of [3, 6, 9, 12]
    assert bn.running_var.item() == pytest.approx(15.0)  # unbiased variance: 45 / 3
    assert not averaged.training


def test_training_with_swa_checkpoints_the_mean_of_the_last_epochs(tmp_path: Path) -> None:
    base = TrainConfig(dataset="digits", loss="ce", width=4, batch_size=64, epochs=3, lr=0.05, seed=1)
    # the per-epoch weights: checkpoints of the same run, stopped after epochs 2 and 3
    run_training(replace(base, epochs=2), tmp_path / "two", progress=False)
    run_training(base, tmp_path / "three", progress=False)
    run_training(replace(base, swa_epochs=2), tmp_path / "swa", progress=False)
    w2 = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["state_dict"]
    w3 = load_checkpoint(tmp_path / "three" / "checkpoint.pt")["state_dict"]
    swa = load_checkpoint(tmp_path / "swa" / "checkpoint.pt")
    assert swa["swa"]["averaged"] == 2 and swa["swa"]["finalized"]
    name = "predictor.weight"
    torch.testing.assert_close(swa["state_dict"][name], (w2[name] + w3[name]) / 2, atol=1e-6, rtol=0)
    # BatchNorm statistics were recomputed for the averaged weights: not epoch 3's
    bn = "body.1.running_mean"
    assert not torch.allclose(swa["state_dict"][bn], w3[bn])
    assert int(swa["state_dict"]["body.1.num_batches_tracked"]) == 16  # one pass: 16 batches
    model_from_checkpoint(swa)  # the checkpoint rebuilds (and exports) like any other
    with pytest.raises(ValueError, match="finished SWA run"):
        run_training(TrainConfig(epochs=4), tmp_path / "swa", resume=True, progress=False)


def test_swa_lr_reaches_the_averaged_epochs_of_a_run(tmp_path: Path) -> None:
    config = TrainConfig(
        dataset="digits", loss="ce", width=4, batch_size=64, epochs=3, lr=0.05, schedule="step", lr_step=10
    )
    run_training(replace(config, swa_epochs=1, swa_lr=0.01), tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in lines if x["split"] == "val"] == pytest.approx([0.05, 0.05, 0.01])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]["swa_lr"] == 0.01


def test_swa_epochs_beyond_the_run_are_refused() -> None:
    with pytest.raises(ValueError, match="swa_epochs"):
        TrainConfig(epochs=3, swa_epochs=4).validate()
