"""Losses against values worked out by hand on a two-sample batch.

Batch (K = 2 classes, both labels 0):
    f logits  [[0, 0], [ln 3, 0]]  → CE = [ln 2, ln 4/3],  max softmax s = [1/2, 3/4]
    g         [1/4, 3/4]           → φ̂ = 1/2
    h logits  [[0, 0], [0, 0]]     → CE(h) = ln 2
    r̂ = mean(CE·g)/φ̂ = (ln 2 / 4 + 3 ln(4/3) / 4) / 2 / (1/2) = 0.25 ln 2 + 0.75 ln(4/3) = 0.389049
"""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import CrossEntropyLoss, SelectiveNetLoss, SyncLoss, build_loss
from training.model import SelectiveOutput

LN2, LN43 = math.log(2), math.log(4 / 3)
RISK = 0.25 * LN2 + 0.75 * LN43


def batch(selection: list[float] | None = None) -> tuple[SelectiveOutput, torch.Tensor]:
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    g = torch.tensor(selection or [0.25, 0.75], requires_grad=True)
    aux = torch.zeros(2, 2, requires_grad=True)
    return SelectiveOutput(logits, g, aux), torch.tensor([0, 0])


def test_ce_is_mean_cross_entropy_of_f() -> None:
    out, y = batch()
    assert CrossEntropyLoss()(out, y).total.item() == pytest.approx((LN2 + LN43) / 2, abs=1e-6)


def test_selectivenet_by_hand_with_coverage_penalty() -> None:
    out, y = batch()
    result = SelectiveNetLoss(target_coverage=0.8, alpha=0.5, lam=32.0)(out, y)
    # penalty 32 · (0.8 − 0.5)² = 2.88
    assert result.terms["coverage"].item() == pytest.approx(0.5)
    assert result.terms["selective_risk"].item() == pytest.approx(RISK, abs=1e-6)
    assert result.terms["coverage_penalty"].item() == pytest.approx(2.88, abs=1e-5)
    assert result.terms["aux_ce"].item() == pytest.approx(LN2, abs=1e-6)
    assert result.total.item() == pytest.approx(0.5 * (RISK + 2.88) + 0.5 * LN2, abs=1e-5)


def test_coverage_penalty_is_one_sided() -> None:
    # coverage 0.5 above the target 0.4: max(0, 0.4 − 0.5)² = 0, not (−0.1)² · 32 = 0.32
    out, y = batch()
    result = SelectiveNetLoss(target_coverage=0.4)(out, y)
    assert result.terms["coverage_penalty"].item() == 0.0
    assert result.total.item() == pytest.approx(0.5 * RISK + 0.5 * LN2, abs=1e-6)


def test_selection_of_shape_b_by_1_is_refused_not_broadcast() -> None:
    # (B,) · (B, 1) would silently broadcast to (B, B): mean(CE)·mean(g)/φ̂ = 0.4904 instead of 0.3890
    out, y = batch()
    column = SelectiveOutput(out.logits, out.selection.unsqueeze(1), out.aux_logits)
    with pytest.raises(ValueError, match=r"selection should be \[B=2\]"):
        SelectiveNetLoss()(column, y)
    with pytest.raises(ValueError, match=r"selection should be \[B=2\]"):
        SyncLoss()(column, y)


def test_sync_adds_beta_times_bce_to_the_softmax_response_of_f() -> None:
    out, y = batch()
    # BCE(1/4, 1/2) = ½(ln 4 + ln 4/3); BCE(3/4, 3/4) = ¾ ln 4/3 + ¼ ln 4
    bce = (0.5 * (2 * LN2 + LN43) + (0.75 * LN43 + 0.5 * LN2)) / 2
    result = SyncLoss(target_coverage=0.8, beta=0.5)(out, y)
    assert result.terms["sync_bce"].item() == pytest.approx(bce, abs=1e-6)
    assert result.total.item() == pytest.approx(0.5 * (RISK + 2.88) + 0.5 * LN2 + 0.5 * bce, abs=1e-5)


def test_sync_prior_h_uses_the_auxiliary_head() -> None:
    out, y = batch()
    # h gives s = [1/2, 1/2]: BCE(1/4, 1/2) = BCE(3/4, 1/2) = ½(ln 4 + ln 4/3)
    result = SyncLoss(prior="h")(out, y)
    assert result.terms["sync_bce"].item() == pytest.approx(0.5 * (2 * LN2 + LN43), abs=1e-6)


def test_sync_with_beta_zero_is_exactly_selectivenet() -> None:
    out_a, y = batch()
    out_b, _ = batch()
    sn = SelectiveNetLoss(target_coverage=0.7)(out_a, y).total
    sync = SyncLoss(target_coverage=0.7, beta=0.0)(out_b, y).total
    sn.backward()
    sync.backward()
    assert torch.equal(sn, sync)
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_sync_prior_is_a_stop_gradient_target() -> None:
    # The BCE term must move g only: f's gradient is the same as without it.
    out_a, y = batch()
    out_b, _ = batch()
    SelectiveNetLoss()(out_a, y).total.backward()
    SyncLoss(beta=1.0)(out_b, y).total.backward()
    assert torch.equal(out_a.logits.grad, out_b.logits.grad)
    assert not torch.equal(out_a.selection.grad, out_b.selection.grad)


def test_argument_errors_name_the_valid_range() -> None:
    with pytest.raises(ValueError, match=r"target_coverage should be in \(0, 1\], but got 0"):
        SelectiveNetLoss(target_coverage=0.0)
    with pytest.raises(ValueError, match=r"beta .* should be >= 0"):
        SyncLoss(beta=-1.0)
    with pytest.raises(ValueError, match="prior should be one of f, h"):
        SyncLoss(prior="g")
    with pytest.raises(ValueError, match="loss should be one of ce, selectivenet, sync"):
        build_loss("focal")
