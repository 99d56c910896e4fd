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
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode

from abstain.training.loop import Runtime, _autocast
from abstain.training.losses import CrossEntropyLoss, SelectiveNetLoss, SyncLoss, build_loss
from abstain.training.model import ModelConfig, SelectiveNet, SelectiveOutput

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
    for a, b in zip(out_a[:3], out_b[:3], strict=True):  # selection_logit: None in hand-built outputs
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


def test_sync_bce_from_the_logit_equals_the_bce_of_g_and_stays_exact_where_g_saturates() -> None:
    out, y = batch()
    z = torch.logit(out.selection.detach()).requires_grad_()  # [ln 1/3, ln 3]
    with_logit = SelectiveOutput(out.logits, torch.sigmoid(z), out.aux_logits, z)
    bce = (0.5 * (2 * LN2 + LN43) + (0.75 * LN43 + 0.5 * LN2)) / 2  # as in the test above
    assert SyncLoss()(with_logit, y).terms["sync_bce"].item() == pytest.approx(bce, abs=1e-6)
    # z = 20: g = sigmoid(20) rounds to 1.0 in float32 (so the SelectiveNet terms give z no
    # gradient), yet with s = 1/2 (f's logits are 0): BCE = softplus(20) − 10 ≈ 10, and
    # dL/dz = β · (g − s) / B = 0.5 · 0.5 / 2 = 0.125 — from the logit, not 0 through the sigmoid.
    z = torch.tensor([20.0, 20.0], requires_grad=True)
    saturated = SelectiveOutput(torch.zeros(2, 2), torch.sigmoid(z), torch.zeros(2, 2), z)
    assert saturated.selection[0].item() == 1.0
    result = SyncLoss(beta=0.5)(saturated, y)
    assert result.terms["sync_bce"].item() == pytest.approx(math.log1p(math.exp(20.0)) - 10.0, rel=1e-6)
    result.total.backward()
    assert z.grad.tolist() == pytest.approx([0.125, 0.125])
    with pytest.raises(ValueError, match=r"selection_logit should have the shape of selection \(2,\)"):
        SyncLoss()(SelectiveOutput(out.logits, out.selection, out.aux_logits, z.view(2, 1)), y)


class _RecordOps(TorchDispatchMode):
    """Records every ATen op call (after autocast has rewritten it) with its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss_name", ["ce", "selectivenet", "sync"])
def test_training_step_passes_cuda_autocast_policy_on_cpu(loss_name: str) -> None:
    """CUDA autocast refuses some ops (``binary_cross_entropy``: "unsafe to autocast") that CPU
    autocast runs, so a CPU run of the AMP path proves nothing for CUDA. Here the ops of a
    training step's forward + loss, under the loop's own autocast context (bf16, as on CUDA),
    are replayed through PyTorch's AutocastCUDA kernels, which apply the CUDA policy whatever
    the tensors' device; an op without such a kernel falls through autocast (allowed as is)."""
    torch.manual_seed(0)
    model = SelectiveNet(ModelConfig("small_cnn", 10, 1, 8, (0.0,), (1.0,), width=8)).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    runtime = Runtime(device=torch.device("cpu"), amp=True, channels_last=False)
    recorder = _RecordOps()
    with _autocast(runtime), recorder:
        build_loss(loss_name)(model(x), y).total  # noqa: B018
    replayed = set()
    for func, args, kwargs in recorder.calls:
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), DispatchKey.AutocastCUDA):
            func._op_dk(DispatchKey.AutocastCUDA, *args, **kwargs)  # raises for a refused op
            replayed.add(func.name())
    assert {"aten::convolution", "aten::addmm"} <= replayed  # the replay really ran the CUDA policy
    if loss_name == "sync":
        assert "aten::binary_cross_entropy_with_logits" in replayed


def test_the_cuda_autocast_replay_catches_binary_cross_entropy() -> None:
    # the check above is not vacuous: the op SYNC used to call is refused by the CUDA policy
    g, s = torch.rand(4), torch.rand(4)
    with pytest.raises(RuntimeError, match="unsafe to autocast"):
        torch.ops.aten.binary_cross_entropy.default._op_dk(DispatchKey.AutocastCUDA, g, s, None, 1)
