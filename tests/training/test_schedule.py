"""Learning-rate schedules against values worked out by hand.

Cosine with base lr 0.1, 2 optimiser steps per epoch, 4 epochs (T = 8 steps), 1 warm-up epoch
(W = 2 steps); lr of step t (0-based):
    t = 0: 0.1 · 1/2 = 0.05            t = 1: 0.1 · 2/2 = 0.1
    t = 2: 0.1 · ½(1 + cos 0) = 0.1    t = 3: 0.1 · ½(1 + cos(π/6)) = 0.0933013
    t = 5: 0.1 · ½(1 + cos(π/2)) = 0.05
    t = 7: 0.1 · ½(1 + cos(5π/6)) = 0.0066987
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from abstain.training.config import TrainConfig
from abstain.training.loop import run_training
from abstain.training.schedule import build_schedule, cosine_factor

COSINE = {0: 0.05, 1: 0.1, 2: 0.1, 3: 0.0933013, 4: 0.075, 5: 0.05, 6: 0.025, 7: 0.0066987}


def optimizer(lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs_per_step(name: str, steps: int, steps_per_epoch: int, **kwargs: int | float) -> list[float]:
    opt = optimizer()
    schedule = build_schedule(opt, name, steps_per_epoch=steps_per_epoch, **kwargs)  # type: ignore[arg-type]
    seen = []
    for t in range(steps):
        seen.append(opt.param_groups[0]["lr"])  # the lr that optimiser step t runs at
        opt.step()
        schedule.after_step()
        if (t + 1) % steps_per_epoch == 0:
            schedule.after_epoch()
    return seen


def test_cosine_with_linear_warmup_by_hand() -> None:
    seen = lrs_per_step("cosine", 8, 2, epochs=4, lr_step=1, lr_gamma=0.5, warmup_epochs=1)
    assert seen == pytest.approx([COSINE[t] for t in range(8)], abs=1e-7)
    assert cosine_factor(3, 2, 8) == pytest.approx(0.933013, abs=1e-6)


def test_cosine_without_warmup_starts_at_the_base_lr() -> None:
    # W = 0: t = 0 → ½(1 + cos 0) = 1; t = 4 of 8 → ½(1 + cos(π/2)) = 0.5
    seen = lrs_per_step("cosine", 8, 2, epochs=4, lr_step=1, lr_gamma=0.5, warmup_epochs=0)
    assert seen[0] == pytest.approx(0.1) and seen[4] == pytest.approx(0.05)


def test_step_decay_halves_per_epoch_block_not_per_step() -> None:
    # lr_step 2 epochs of 2 steps: steps 0-3 at 0.1, 4-7 at 0.05
    seen = lrs_per_step("step", 8, 2, epochs=4, lr_step=2, lr_gamma=0.5, warmup_epochs=1)
    assert seen == pytest.approx([0.1] * 4 + [0.05] * 4)


def test_swa_lr_holds_a_constant_lr_after_a_cosine_compressed_to_the_other_epochs() -> None:
    # 4 epochs of 2 steps, the last one averaged at 0.02: the cosine runs over T = 6 steps (W = 2),
    # t = 3: ½(1 + cos(π/4))·0.1 = 0.0853553, t = 4: ½(1 + cos(π/2))·0.1, t = 5: ½(1 + cos(3π/4))·0.1
    seen = lrs_per_step(
        "cosine", 8, 2, epochs=4, lr_step=1, lr_gamma=0.5, warmup_epochs=1, swa_epochs=1, swa_lr=0.02
    )
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.0853553, 0.05, 0.0146447, 0.02, 0.02], abs=1e-7)


def test_swa_lr_after_step_decay() -> None:
    # halved after 2 epochs, then the averaged 4th epoch at 0.02
    seen = lrs_per_step(
        "step", 8, 2, epochs=4, lr_step=2, lr_gamma=0.5, warmup_epochs=0, swa_epochs=1, swa_lr=0.02
    )
    assert seen == pytest.approx([0.1] * 4 + [0.05] * 2 + [0.02] * 2)


def test_swa_lr_needs_averaged_epochs_and_some_scheduled_ones() -> None:
    with pytest.raises(ValueError, match="it needs swa_epochs >= 1"):
        TrainConfig(swa_lr=0.01).validate()
    with pytest.raises(ValueError, match="swa_lr should be positive"):
        TrainConfig(swa_lr=0.0, swa_epochs=1).validate()
    with pytest.raises(ValueError, match=r"swa_epochs \(3\) should be fewer than the 3 epochs"):
        TrainConfig(epochs=3, swa_epochs=3, swa_lr=0.01).validate()
    # the cosine's warm-up must fit the epochs before the averaged ones; the default one shrinks
    with pytest.raises(ValueError, match=r"warmup_epochs \(1\) should be fewer than the 1 epochs"):
        TrainConfig(schedule="cosine", epochs=3, swa_epochs=2, swa_lr=0.01, warmup_epochs=1).validate()
    shrunk = TrainConfig(dataset="fashion-mnist", epochs=3, swa_epochs=2, swa_lr=0.01).resolved()
    assert shrunk.warmup_epochs == 0


def test_unknown_schedule_and_too_long_warmup_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule should be one of step, cosine"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(schedule="cosine", epochs=2, warmup_epochs=2).validate()


def test_the_schedule_defaults_per_dataset_and_a_one_epoch_run_has_no_warm_up() -> None:
    # cosine where issue 19's benchmark measured it; step where digits' validation preferred it and,
    # the paper's, for CIFAR-100-sized runs
    resolved = {ds: TrainConfig(dataset=ds).resolved() for ds in ("fashion-mnist", "digits", "cifar100")}
    assert [r.schedule for r in resolved.values()] == ["cosine", "step", "step"]
    assert TrainConfig(dataset="imagefolder").resolved().schedule == "step"
    assert resolved["fashion-mnist"].warmup_epochs == 1
    assert TrainConfig(dataset="fashion-mnist", schedule="step").resolved().schedule == "step"
    # the default warm-up shrinks to fit a 1-epoch run; an explicit one that does not fit is refused
    assert TrainConfig(dataset="fashion-mnist", epochs=1).resolved().warmup_epochs == 0
    with pytest.raises(ValueError, match=r"warmup_epochs \(1\) should be fewer than the 1 epochs"):
        TrainConfig(dataset="fashion-mnist", epochs=1, warmup_epochs=1).resolved()


def test_training_loop_logs_the_cosine_lr_of_each_epochs_first_step(tmp_path: Path) -> None:
    # digits train has 1,078 images: 16 full batches of 64 per epoch; 3 epochs, W = 16, T = 48
    config = TrainConfig(
        dataset="digits", loss="ce", width=4, batch_size=64, epochs=3, lr=0.1, schedule="cosine"
    )
    run_training(replace(config, warmup_epochs=1), tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if x["split"] == "val"]
    # epoch 1 starts at step 0: 0.1/16; epoch 2 at step 16: 0.1; epoch 3 at step 32: ½(1 + cos(π/2))·0.1
    assert lrs == pytest.approx([0.1 / 16, 0.1, 0.05], abs=1e-9)
