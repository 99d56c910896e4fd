"""SelectiveNet/SYNC ablation flags: g on detached features; the reference's risk without /φ̂.

Risk by hand (the batch of test_losses.py: CE = [ln 2, ln 4/3], g = [1/4, 3/4], both labels 0):
    mean(ℓ·g) = (ln 2 / 4 + 3 ln(4/3) / 4) / 2 = 0.1945245      (the Keras reference)
    mean(ℓ·g) / φ̂ = 0.1945245 / 0.5 = 0.3890490                 (the paper's eq. 2)
"""

from __future__ import annotations

import math

import pytest
import torch

from abstain.training.losses import SelectiveNetLoss, SyncLoss, build_loss
from abstain.training.model import ModelConfig, SelectiveNet, SelectiveOutput

PRODUCT = (0.25 * math.log(2) + 0.75 * math.log(4 / 3)) / 2


def batch() -> tuple[SelectiveOutput, torch.Tensor]:
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    return SelectiveOutput(logits, torch.tensor([0.25, 0.75]), torch.zeros(2, 2)), torch.tensor([0, 0])


def test_risk_without_dividing_by_coverage_by_hand() -> None:
    out, y = batch()
    ratio = SelectiveNetLoss(target_coverage=0.4)(out, y)
    product = SelectiveNetLoss(target_coverage=0.4, divide_by_coverage=False)(out, y)
    assert ratio.terms["selective_risk"].item() == pytest.approx(2 * PRODUCT, abs=1e-6)
    assert product.terms["selective_risk"].item() == pytest.approx(PRODUCT, abs=1e-6)
    # penalty 0 (φ̂ 0.5 ≥ c 0.4): L = ½ r̂ + ½ ln 2
    assert product.total.item() == pytest.approx(0.5 * PRODUCT + 0.5 * math.log(2), abs=1e-6)
    sync = build_loss("sync", target_coverage=0.4, beta=0.0, divide_by_coverage=False)
    assert sync(out, y).total.item() == pytest.approx(product.total.item(), abs=1e-7)


def body_gradient(detach: bool, loss: torch.nn.Module) -> float:
    """Largest |∂L/∂w| over the body when only g's path reaches it (f and h detached)."""
    torch.manual_seed(0)
    model = SelectiveNet(ModelConfig("small_cnn", 2, 1, 8, width=4, detach_selection=detach)).train()
    out = model(torch.rand(6, 1, 8, 8))
    out = out._replace(logits=out.logits.detach(), aux_logits=out.aux_logits.detach())
    loss(out, torch.tensor([0, 1, 0, 1, 0, 1])).total.backward()
    grads = [p.grad.abs().max().item() for p in model.body.parameters() if p.grad is not None]
    selector = max(p.grad.abs().max().item() for p in model.selector.parameters() if p.grad is not None)
    assert selector > 0  # g itself still learns from its terms either way
    return max(grads, default=0.0)


@pytest.mark.parametrize(
    "loss",
    [SelectiveNetLoss(target_coverage=0.9), SyncLoss(target_coverage=0.9, beta=1.0)],
    ids=["sn", "sync"],
)
def test_detached_selection_sends_no_gradient_from_g_terms_into_the_body(loss: torch.nn.Module) -> None:
    assert body_gradient(False, loss) > 1e-6  # without the flag the coverage/SYNC terms move the body
    assert body_gradient(True, loss) == 0.0


def test_detached_selection_changes_nothing_at_inference() -> None:
    torch.manual_seed(0)
    a = SelectiveNet(ModelConfig("small_cnn", 2, 1, 8, width=4)).eval()
    b = SelectiveNet(ModelConfig("small_cnn", 2, 1, 8, width=4, detach_selection=True)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(a(x).selection, b(x).selection)
