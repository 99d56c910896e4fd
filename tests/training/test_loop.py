"""The training loop on digits: outputs, checkpoint contents, exact resumption, the AMP path, metrics."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from abstain.contract import TABLE_COVERAGES
from abstain.datasets import load_digits
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import load_data
from training.loop import Runtime, make_loader, run_training, selective_metrics, train_one_epoch
from training.losses import SyncLoss
from training.model import ModelConfig, SelectiveNet

# A small, fast configuration: digits, a narrow CNN, a few epochs (each well under a second).
TINY = TrainConfig(dataset="digits", loss="sync", width=8, batch_size=64, epochs=3, lr=0.05, seed=3)
CPU = Runtime(device=torch.device("cpu"), amp=False, channels_last=False)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_a_checkpoint_that_rebuilds_the_model(tmp_path: Path) -> None:
    test = run_training(replace(TINY, epochs=2), tmp_path, progress=False)
    lines = read_metrics(tmp_path)
    assert [x["split"] for x in lines] == ["val", "val", "test"]
    assert [x["epoch"] for x in lines] == [1, 2, 2]
    assert lines[-1] == json.loads(json.dumps(test))
    assert set(test["risk_at_coverage"]) == set(TABLE_COVERAGES)
    assert {"train_loss", "train_sync_bce", "train_coverage", "accuracy", "coverage", "selective_risk",
            "aurc"} <= set(lines[0])

    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True inside
    assert ckpt["epoch"] == 2 and ckpt["metrics"]["split"] == "test"
    assert ckpt["class_names"] == [str(d) for d in range(10)]
    assert ckpt["input_spec"]["channels"] == 1 and ckpt["input_spec"]["height"] == 8
    assert ckpt["train_config"]["loss"] == "sync" and ckpt["train_config"]["width"] == 8
    assert ckpt["data_fingerprint"] == load_digits("train").fingerprint
    assert ckpt["code_version"].startswith("0.1.0")

    # the rebuilt model alone reproduces the recorded test accuracy
    model = model_from_checkpoint(ckpt)
    split = load_digits("test")
    with torch.inference_mode():
        logits = model(torch.from_numpy(split.x)).logits.numpy()
    assert float((logits.argmax(1) == split.y).mean()) == pytest.approx(test["accuracy"], abs=1e-9)


def test_resume_two_plus_one_equals_three(tmp_path: Path) -> None:
    run_training(TINY, tmp_path / "straight", progress=False)
    run_training(replace(TINY, epochs=2), tmp_path / "resumed", progress=False)
    run_training(TrainConfig(epochs=3), tmp_path / "resumed", resume=True, progress=False)

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    def timeless(out: Path) -> list[dict]:
        return [{k: v for k, v in x.items() if k != "epoch_seconds"} for x in read_metrics(out)]

    strip, again = timeless(tmp_path / "straight"), timeless(tmp_path / "resumed")
    assert strip == again  # epochs 1-2 kept, the 2-epoch test line replaced by epoch 3 and the new test


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path: Path) -> None:
    run_training(replace(TINY, epochs=1), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        run_training(replace(TINY, epochs=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="already trained 1 epochs"):
        run_training(TrainConfig(epochs=1), tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run_training(TINY, tmp_path / "empty", resume=True, progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    save_checkpoint(tmp_path / "checkpoint.pt", dict(ckpt, data_fingerprint="sha256:other"))
    with pytest.raises(ValueError, match="the training data differs"):
        run_training(TrainConfig(epochs=2), tmp_path, resume=True, progress=False)


def test_bf16_autocast_path_steps_the_optimiser_once_per_batch() -> None:
    torch.manual_seed(0)
    data = load_data("digits")
    model = SelectiveNet(ModelConfig("small_cnn", 10, 1, 8, (0.0,), (1.0,), width=8))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    runtime = replace(CPU, amp=True, channels_last=True)  # the CUDA settings, on CPU
    loader = make_loader(data.train, 256, train=True, seed=0, runtime=runtime, num_workers=0)
    terms = train_one_epoch(model, SyncLoss(), loader, optimizer, runtime, epoch=1, progress=False)
    assert len(steps) == len(data.train) // 256 == 4  # drop_last: 1078 // 256 batches, one step each
    assert np.isfinite(terms["loss"]) and terms["coverage"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_selective_metrics_by_hand() -> None:
    # 4 samples, class 0 true for all; predictions right, wrong, right, wrong
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    labels = np.zeros(4, dtype=np.int64)
    g = np.array([0.9, 0.8, 0.4, 0.1], dtype=np.float32)
    m = selective_metrics(logits, g, labels, "selection")
    assert m["accuracy"] == 0.5
    assert m["coverage"] == 0.5 and m["selective_risk"] == 0.5  # g >= 0.5 keeps samples 0, 1
    assert m["risk_at_coverage"]["1.0"] == 0.5
    assert m["risk_at_coverage"]["0.75"] == pytest.approx(1 / 3)  # top 3 by g: right, wrong, right
    # AURC by g: mean of risks of top-1..4 = (0 + 1/2 + 1/3 + 1/2) / 4
    assert m["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    # softmax response ranks 0 (0.95), 3 (0.95, wrong), 1 and 2 (0.73): ties in expectation
    sr = selective_metrics(logits, g, labels, "softmax_response")
    assert sr["score"] == "softmax_response"
    assert sr["aurc"] == pytest.approx(sr["aurc_by_score"]["softmax_response"])
    assert sr["aurc"] != pytest.approx(m["aurc"])


def test_config_errors_list_the_choices() -> None:
    with pytest.raises(ValueError, match="loss should be one of ce, selectivenet, sync, but got 'sn'"):
        TrainConfig(loss="sn").validate()
    with pytest.raises(ValueError, match="body should be one of small_cnn, vgg16_bn, resnet18, resnet34"):
        TrainConfig(body="vgg19").validate()
    with pytest.raises(ValueError, match=r"target_coverage should be in \(0, 1\]"):
        TrainConfig(target_coverage=1.5).validate()
    resolved = TrainConfig(dataset="fashion-mnist").resolved()
    assert (resolved.body, resolved.width, resolved.epochs) == ("small_cnn", 16, 12)
