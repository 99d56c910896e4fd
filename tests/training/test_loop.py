"""The training loop on digits: outputs, checkpoint contents, exact resumption, the AMP path, metrics."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import Dataset

import abstain.training.loop
from abstain.contract import TABLE_COVERAGES
from abstain.datasets import load_digits
from abstain.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from abstain.training.config import TrainConfig
from abstain.training.data import DataBundle, load_data
from abstain.training.loop import (
    Runtime,
    _autocast,
    make_loader,
    predict,
    run_training,
    seed_epoch,
    selective_metrics,
    train_one_epoch,
)
from abstain.training.losses import SyncLoss
from abstain.training.model import ModelConfig, SelectiveNet

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
    assert {
        "train_loss",
        "train_sync_bce",
        "train_coverage",
        "accuracy",
        "coverage",
        "selective_risk",
        "aurc",
    } <= set(lines[0])

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


def test_the_default_loss_is_ce_ranked_and_exported_by_its_softmax_response(tmp_path: Path) -> None:
    """Issue 19: with no loss named, ``ce``; its ``selection`` is f's softmax response, never its
    untrained g."""
    from abstain.export.pipeline import build_verified_graph

    test = run_training(
        TrainConfig(dataset="digits", width=4, batch_size=64, epochs=1), tmp_path, progress=False
    )
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["train_config"]["loss"] == "ce" and test["score"] == "softmax_response"
    assert ckpt["model_config"]["selection_source"] == "softmax_response"
    assert not ckpt["model_config"]["abstain_head"]
    graph, _ = build_verified_graph(ckpt, "0" * 64)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    logits, selection, _ = session.run(None, {"pixels": x})
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(selection, p.max(1), atol=1e-6)
    # the recorded metrics rank by that score: AURC by selection and by softmax response agree
    assert test["aurc_by_score"]["selection"] == pytest.approx(test["aurc_by_score"]["softmax_response"])


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


class RandomlyAugmented(Dataset):
    """A dataset whose items are drawn at random from torch's RNG, as torchvision's transforms
    (random crop, flip) draw them: in the main process or in the loader's worker processes."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x + 0.1 * torch.randn_like(x)).clamp(0.0, 1.0), y


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_random_augmentation_in_loader_workers(
    tmp_path: Path, monkeypatch, workers: int
) -> None:
    # Persistent workers seeded once per loader used to restart their augmentation stream
    # from epoch 1's state after a resume; now every epoch's streams depend on (seed, epoch, rank).
    digits = load_data("digits")
    augmented = DataBundle(**{**vars(digits), "train": RandomlyAugmented(digits.train)})
    monkeypatch.setattr(abstain.training.loop, "load_data", lambda *args, **kwargs: augmented)
    config = replace(TINY, num_workers=workers)
    run_training(config, tmp_path / "straight", progress=False)
    run_training(replace(config, epochs=2), tmp_path / "resumed", progress=False)
    run_training(TrainConfig(epochs=3), tmp_path / "resumed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert b["train_config"]["num_workers"] == workers
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_every_epoch_and_rank_has_its_own_random_streams_and_fresh_training_workers() -> None:
    # Under DDP each rank must draw its own dropout/augmentation, and a resumed rank must not
    # need another rank's saved RNG state: the streams are a function of (seed, epoch, rank).
    loader = make_loader(load_data("digits").train, 64, train=True, seed=3, runtime=CPU, num_workers=2)
    assert loader.persistent_workers is False  # a persistent worker would keep epoch 1's seed

    def draws(epoch: int, rank: int) -> tuple[list[float], int]:
        seed_epoch(loader, 3, epoch, rank)
        return torch.rand(3).tolist(), loader.generator.initial_seed()

    seen = {(epoch, rank): draws(epoch, rank) for epoch in (1, 2) for rank in (0, 1)}
    assert len({str(v) for v in seen.values()}) == 4
    torch.rand(100)  # whatever ran in between
    assert draws(2, 1) == seen[2, 1] and loader.sampler.epoch == 2


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


def _tiny_model(selection_bias: float | None = None) -> SelectiveNet:
    torch.manual_seed(0)
    model = SelectiveNet(ModelConfig("small_cnn", 10, 1, 8, (0.0,), (1.0,), width=8))
    if selection_bias is not None:
        with torch.no_grad():
            model.selector[-1].bias.fill_(selection_bias)  # g near sigmoid(bias)
            model.selector[-1].weight.mul_(10.0)  # logits spread over ~0.01 around the bias
    return model


def test_heads_are_float32_under_bf16_autocast_so_confident_samples_stay_ranked() -> None:
    # In bf16, g's logit near 5 steps by 0.03 and g near 0.993 steps by 0.004: 16 confident
    # samples would share one or two values of g. The heads run in float32 under autocast.
    model = _tiny_model(selection_bias=5.0).eval()
    x = torch.from_numpy(load_digits("test").x[:16])
    with torch.inference_mode():
        features = model.forward_features(x).bfloat16()  # what the bf16 body hands the heads
        reference = model.forward_heads(features.float())  # float32 heads, no autocast
        with _autocast(replace(CPU, amp=True)):
            heads = model.forward_heads(features)
            out = model(x)
    for field in ("logits", "selection", "aux_logits", "selection_logit"):
        assert getattr(out, field).dtype == torch.float32, field
        assert torch.equal(getattr(heads, field), getattr(reference, field)), field
    assert torch.equal(out.selection, torch.sigmoid(out.selection_logit))
    assert (out.selection < 1.0).all() and len(torch.unique(out.selection)) == 16


def test_predict_ignores_autocast_so_recorded_metrics_are_the_float32_graphs() -> None:
    model = _tiny_model(selection_bias=2.0)
    data = load_data("digits")
    amp = replace(CPU, amp=True, channels_last=True)  # the CUDA settings, on CPU
    loader = make_loader(data.test, 128, train=False, seed=0, runtime=CPU, num_workers=0)
    logits_amp, selection_amp, labels = predict(model, loader, amp)
    logits, selection, _ = predict(model, loader, CPU)
    assert logits_amp.dtype == selection_amp.dtype == np.float32
    # equal up to float32 rounding (channels_last picks other kernels); bf16 would be ~1e-3 off
    np.testing.assert_allclose(selection_amp, selection, rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits_amp, logits, rtol=0, atol=1e-5)
    with torch.inference_mode():
        reference = model.eval()(torch.from_numpy(load_digits("test").x))
    np.testing.assert_allclose(selection, reference.selection.numpy(), rtol=0, atol=1e-6)
    assert labels.shape == selection.shape == (len(data.test),)


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
    with pytest.raises(ValueError, match="loss should be one of ce, selectivenet, sync, sat, but got 'sn'"):
        TrainConfig(loss="sn").validate()
    with pytest.raises(ValueError, match="body should be one of small_cnn, vgg16_bn, resnet18, resnet34"):
        TrainConfig(body="vgg19").validate()
    with pytest.raises(ValueError, match=r"target_coverage should be in \(0, 1\]"):
        TrainConfig(target_coverage=1.5).validate()
    resolved = TrainConfig(dataset="fashion-mnist").resolved()
    assert (resolved.body, resolved.width, resolved.epochs) == ("small_cnn", 16, 12)
