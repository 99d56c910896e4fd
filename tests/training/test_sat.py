"""Self-Adaptive Training (+ entropy minimisation) against values worked out by hand.

Batch of 2 samples, K = 3 classes, both labels 0, abstain logit 0 for both:
    sample 0: z = [0, 0, 0]       p = [1/3, 1/3, 1/3]   q = log_softmax([z, 0]) = ln(1/4) everywhere
    sample 1: z = [ln 2, 0, 0]    p = [1/2, 1/4, 1/4]   softmax([z, 0]) = [2/5, 1/5, 1/5, 1/5]
CE phase: mean(ln 3, ln 2) = 0.8958797.
SAT phase, m = 0.9, first update (targets start at 1): t = 0.9 + 0.1·p_y = [0.9333333, 0.95]
    sat_0 = −(t_0 ln ¼ + (1 − t_0) ln ¼) = ln 4 = 1.3862944
    sat_1 = −(0.95 ln(2/5) + 0.05 ln(1/5)) = 0.9509483
    L_SAT = 1.1686213;  H = mean(ln 3, ½ ln 2 + ½ ln 4) = mean(1.0986123, 1.0397208) = 1.0691665
    with w = 0.01: L = 1.1686213 + 0.0106917 = 1.1793130
second update: t = 0.9·t + 0.1·p_y = [0.8733333, 0.905]
    sat_1 = −(0.905 ln(2/5) + 0.095 ln(1/5)) = 0.9821404, L_SAT = mean(1.3862944, 0.9821404) = 1.1842174
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from abstain.training.checkpoint import load_checkpoint, model_from_checkpoint
from abstain.training.config import TrainConfig
from abstain.training.loop import run_training
from abstain.training.losses import SelfAdaptiveTrainingLoss, build_loss
from abstain.training.model import ModelConfig, SelectiveNet, SelectiveOutput, softmax_response_logit

INDEX = torch.tensor([4, 1])  # the two samples' positions in a training split of 6


def batch() -> tuple[SelectiveOutput, torch.Tensor]:
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]], requires_grad=True)
    abstain = torch.zeros(2, requires_grad=True)
    g = torch.full((2,), 0.5)
    return SelectiveOutput(logits, g, torch.zeros(2, 3), None, abstain), torch.tensor([0, 0])


def test_pretraining_epochs_are_plain_cross_entropy_and_leave_the_targets_alone() -> None:
    loss = SelfAdaptiveTrainingLoss(6, momentum=0.9, pretrain_epochs=2, entropy_weight=0.01)
    loss.epoch = 2
    out, y = batch()
    result = loss(out, y, INDEX)
    assert result.total.item() == pytest.approx((math.log(3) + math.log(2)) / 2, abs=1e-6)
    assert loss.targets.tolist() == [1.0] * 6 and not loss.seen.any()


def test_sat_phase_with_ema_targets_and_entropy_by_hand() -> None:
    loss = SelfAdaptiveTrainingLoss(6, momentum=0.9, pretrain_epochs=2, entropy_weight=0.01)
    loss.epoch = 3
    out, y = batch()
    result = loss(out, y, INDEX)
    assert result.terms["sat"].item() == pytest.approx(1.1686213, abs=1e-6)
    assert result.terms["entropy"].item() == pytest.approx(1.0691665, abs=1e-6)
    assert result.total.item() == pytest.approx(1.1793130, abs=1e-6)
    assert loss.targets[INDEX].tolist() == pytest.approx([0.9333333, 0.95], abs=1e-6)
    untouched = [0, 2, 3, 5]
    assert loss.targets[untouched].tolist() == [1.0] * 4 and loss.seen.tolist() == [0, 1, 0, 0, 1, 0]

    second = loss(*batch(), INDEX)  # the same samples again: the EMA continues from t
    assert loss.targets[INDEX].tolist() == pytest.approx([0.8733333, 0.905], abs=1e-6)
    assert second.terms["sat"].item() == pytest.approx(1.1842174, abs=1e-6)


def test_sat_target_is_a_stop_gradient_and_the_abstain_logit_is_trained() -> None:
    # d L_SAT / d a for sample 1 = (q_abstain − (1 − t)) / B = (1/5 − 0.05) / 2 = 0.075
    loss = SelfAdaptiveTrainingLoss(6, momentum=0.9, entropy_weight=0.0)
    out, y = batch()
    loss(out, y, INDEX).total.backward()
    assert out.abstain_logit is not None and out.abstain_logit.grad is not None
    assert out.abstain_logit.grad[1].item() == pytest.approx(0.075, abs=1e-6)
    # sample 0: q = ¼ everywhere, d/da = (¼ − (1 − 0.9333333)) / 2 = 0.0916667
    assert out.abstain_logit.grad[0].item() == pytest.approx(0.0916667, abs=1e-6)


def test_sat_needs_the_abstain_logit_and_the_split_size() -> None:
    loss = SelfAdaptiveTrainingLoss(6)
    out, y = batch()
    with pytest.raises(ValueError, match="abstain logit"):
        loss(out._replace(abstain_logit=None), y, INDEX)
    with pytest.raises(ValueError, match="num_samples"):
        build_loss("sat")


def test_softmax_response_logit_is_the_logit_of_the_max_softmax_and_does_not_saturate() -> None:
    logits = torch.tensor([[math.log(3), 0.0, 0.0], [1.0, 1.0, -2.0], [40.0, 0.0, 0.0]])
    z = softmax_response_logit(logits)
    # [3/5 → ln 1.5], [tie: e/(2e + e^-2) → logit = 1 − logsumexp(1, −2)], [40 − ln 2]
    assert z[0].item() == pytest.approx(math.log(1.5), abs=1e-6)
    assert z[1].item() == pytest.approx(1 - math.log(math.e + math.exp(-2)), abs=1e-6)
    assert z[2].item() == pytest.approx(40 - math.log(2), abs=1e-5)  # softmax max is 1.0 in float32
    sr = torch.softmax(logits, dim=1).amax(dim=1)
    assert torch.sigmoid(z).tolist() == pytest.approx(sr.tolist(), abs=1e-7)


def test_sat_model_has_k_plus_1_outputs_in_training_and_reports_the_softmax_response() -> None:
    config = ModelConfig(
        "small_cnn", 3, 1, 8, width=4, abstain_head=True, selection_source="softmax_response"
    )
    model = SelectiveNet(config).eval()
    out = model(torch.rand(5, 1, 8, 8))
    assert out.abstain_logit is not None and out.abstain_logit.shape == (5,)
    sr = torch.softmax(out.logits, dim=1).amax(dim=1)
    assert torch.allclose(out.selection, sr, atol=1e-6)


def test_sat_trains_exports_k_logits_and_the_softmax_response(tmp_path: Path) -> None:
    from abstain.export.pipeline import build_verified_graph

    config = TrainConfig(
        dataset="digits",
        loss="sat",
        width=4,
        batch_size=64,
        epochs=2,
        sat_pretrain_epochs=1,
        entropy_weight=0.01,
    )
    test = run_training(config, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    # epoch 2 was SAT: every sample of its 16 full batches of 64 (of 1,078; the last 54 dropped)
    assert int(ckpt["loss_state"]["seen"].sum()) == 16 * 64
    assert test["score"] == "softmax_response"
    graph, _ = build_verified_graph(ckpt, "0" * 64)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    logits, selection, selection_logit = session.run(None, {"pixels": x})
    assert logits.shape == (7, 10)  # K, not K + 1
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(selection, p.max(1), atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-selection_logit)), selection, atol=1e-6)
    with torch.inference_mode():
        torch_logits = model_from_checkpoint(ckpt)(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)


def test_sat_resumes_exactly_with_its_targets(tmp_path: Path) -> None:
    # 2 epochs + --resume to 3 equals 3 straight: epoch 3 continues the targets epoch 2 left
    config = TrainConfig(
        dataset="digits", loss="sat", width=4, batch_size=64, epochs=3, seed=2, sat_pretrain_epochs=1
    )
    run_training(config, tmp_path / "straight", progress=False)
    run_training(TrainConfig(**{**config.to_dict(), "epochs": 2}), tmp_path / "resumed", progress=False)
    run_training(TrainConfig(epochs=3), tmp_path / "resumed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert torch.equal(a["loss_state"]["targets"], b["loss_state"]["targets"])
    assert not torch.equal(a["loss_state"]["targets"], torch.ones_like(a["loss_state"]["targets"]))
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def test_default_pretraining_is_30_percent_fixed_when_the_config_is_resolved() -> None:
    # round(0.3 · 10) = 3, stored in the checkpoint's config, so --resume --epochs 20 keeps 3
    assert TrainConfig(dataset="digits", loss="sat", epochs=10).resolved().sat_pretrain_epochs == 3
    assert TrainConfig(dataset="fashion-mnist", loss="sat").resolved().sat_pretrain_epochs == 4  # of 12
    assert TrainConfig(dataset="digits", loss="ce", epochs=10).resolved().sat_pretrain_epochs is None
