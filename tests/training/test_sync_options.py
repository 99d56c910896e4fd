"""SYNC's options that the quality sweep explores: the ``rank`` term, the β warm-up, no weight
decay on norms/biases, and the training subset — each against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from abstain.contract import InputSpec
from abstain.training.config import TrainConfig
from abstain.training.data import DataBundle, subset_train
from abstain.training.loop import beta_scale, parameter_groups
from abstain.training.losses import SyncLoss, build_loss
from abstain.training.model import SelectiveOutput

LN2, LN43 = math.log(2), math.log(4 / 3)
RISK = 0.25 * LN2 + 0.75 * LN43  # SelectiveNet's r̂ of this batch (see test_losses.py)


def batch() -> tuple[SelectiveOutput, torch.Tensor]:
    """f's softmax responses s = [1/2, 3/4]; g = [1/4, 3/4], so z = logit g = [−ln 3, ln 3]."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    z = torch.tensor([-math.log(3), math.log(3)], requires_grad=True)
    return SelectiveOutput(logits, torch.sigmoid(z), torch.zeros(2, 2), z), torch.tensor([0, 0])


def test_rank_term_is_the_weighted_logistic_pair_loss() -> None:
    # One ordered pair: s_1 = 3/4 > s_0 = 1/2 (w = 1/4), so L = softplus(z_0 − z_1)
    # = ln(1 + e^{−2 ln 3}) = ln(10/9); its gradient in z_1 is −σ(z_0 − z_1) = −1/10 (times β).
    out, y = batch()
    result = SyncLoss(target_coverage=0.5, beta=2.0, term="rank")(out, y)
    assert result.terms["sync_rank"].item() == pytest.approx(math.log(10 / 9), abs=1e-6)
    assert result.total.item() == pytest.approx(0.5 * RISK + 0.5 * LN2 + 2.0 * math.log(10 / 9), abs=1e-5)
    # g ordered as the prior already: swapping g makes the pair wrong and the loss larger
    swapped = SelectiveOutput(out.logits, out.selection.flip(0), out.aux_logits, out.selection_logit.flip(0))
    assert SyncLoss(term="rank")(swapped, y).terms["sync_rank"].item() == pytest.approx(
        math.log(10), abs=1e-6
    )  # softplus(2 ln 3) = ln 10


def test_rank_term_is_zero_without_two_distinct_priors() -> None:
    out, y = batch()
    flat = SelectiveOutput(torch.zeros(2, 2), out.selection, out.aux_logits, out.selection_logit)
    assert SyncLoss(term="rank")(flat, y).terms["sync_rank"].item() == 0.0


def test_beta_scale_multiplies_beta() -> None:
    out, y = batch()
    loss = SyncLoss(target_coverage=0.5, beta=2.0)
    full = loss(out, y)
    loss.beta_scale = 0.25
    quarter = loss(out, y)
    bce = full.terms["sync_bce"].item()
    assert full.total.item() - quarter.total.item() == pytest.approx(2.0 * 0.75 * bce, abs=1e-5)


def test_beta_warmup_ramps_linearly_then_holds() -> None:
    assert [beta_scale(e, 4) for e in (1, 2, 3, 4, 5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert beta_scale(1, 0) == 1.0


def test_no_decay_on_norms_and_biases() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    groups = parameter_groups(model, 5e-4, decay_norm_bias=False)
    decayed, free = groups
    assert decayed["weight_decay"] == 5e-4 and free["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decayed["params"]] == [(4, 3), (2, 4)]  # the two kernels
    assert len(free["params"]) == 4  # 2 biases, BN weight and bias
    # one SGD step from zero gradients: only the kernels shrink, by lr · wd
    optimizer = torch.optim.SGD(groups, lr=1.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in decayed["params"]:
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - 5e-4))
    for p in free["params"]:
        assert torch.equal(p.detach(), before[id(p)])
    assert len(parameter_groups(model, 5e-4, decay_norm_bias=True)[0]["params"]) == 6


def test_train_subset_is_fixed_and_leaves_val_and_test() -> None:
    data = TensorDataset(torch.arange(100).float().view(100, 1, 1, 1), torch.zeros(100, dtype=torch.int64))
    bundle = DataBundle("toy", data, data, data, ("a", "b"), InputSpec(1, 1, 1, (0.0,), (1.0,)), "sha256:x")
    a, b = subset_train(bundle, 10), subset_train(bundle, 10)
    assert len(a.train) == 10 and a.train.indices == b.train.indices  # same 10 every time
    assert len(set(a.train.indices)) == 10
    assert a.val is data and a.test is data
    with pytest.raises(ValueError, match=r"train_subset should be in \[1, 100\]"):
        subset_train(bundle, 101)


def test_config_validates_the_new_fields() -> None:
    with pytest.raises(ValueError, match="sync_term should be one of bce, rank, but got 'margin'"):
        TrainConfig(sync_term="margin").validate()
    with pytest.raises(ValueError, match="beta_warmup should be >= 0"):
        TrainConfig(beta_warmup=-1).validate()
    with pytest.raises(ValueError, match="train_subset should be a positive integer"):
        TrainConfig(train_subset=0).validate()
    with pytest.raises(ValueError, match="term should be one of bce, rank"):
        build_loss("sync", sync_term="margin")


def test_selection_bn_gamma_starts_g_as_the_reference() -> None:
    from abstain.training.model import ModelConfig, SelectiveNet

    config = ModelConfig(body="small_cnn", num_classes=3, in_channels=1, image_size=8, width=4)
    reference = SelectiveNet(ModelConfig(**{**config.to_dict(), "selection_bn_gamma": 0.1}))
    assert torch.all(reference.selector[2].weight == 0.1)
    assert torch.all(SelectiveNet(config).selector[2].weight == 1.0)
