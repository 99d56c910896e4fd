"""Stochastic weight averaging over the last epochs, with BatchNorm statistics re-estimated.

SWA (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018) averages the weights at the end of each of the last N epochs with equal weights:
``w̄ = (1/N) Σ_e w_e``. Zhu et al. ("Rethinking Confidence Calibration for Failure Prediction",
ECCV 2022, FMFP) find such flat minima help failure prediction. Running BatchNorm statistics of
averaged weights are not the average of the members' statistics (they describe other
activations), so they are recomputed with a pass over the training data
(``torch.optim.swa_utils.update_bn``: a cumulative average over every batch, momentum ``None``).

Equal-weight averaging (``AveragedModel``'s default), not an EMA: the issue's SWA "over the last
N epochs" is an average of N snapshots, and its test compares with their plain mean. The
learning rate follows the run's schedule during those epochs (no ``SWALR``): with ``--schedule
cosine`` the last epochs are the low-lr end of the decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader


class WeightAverage:
    """The running equal-weight average of ``model``'s parameters (buffers are not averaged)."""

    def __init__(self, model: nn.Module) -> None:
        self.averaged = AveragedModel(model)  # a deep copy; use_buffers=False: BN stats come from update_bn

    @property
    def count(self) -> int:
        return int(self.averaged.n_averaged.item())

    def update(self, model: nn.Module) -> None:
        """Add ``model``'s current parameters to the average (call once per averaged epoch)."""
        self.averaged.update_parameters(model)

    def finalize(self, loader: DataLoader, device: torch.device) -> nn.Module:
        """Re-estimate the BatchNorm statistics of the averaged weights on ``loader``; return the
        averaged model (``AveragedModel.module``) in eval mode."""
        with torch.no_grad():  # update_bn runs forward passes only; no graph to keep
            update_bn(loader, self.averaged, device=device)  # it takes x from (x, y[, index]) batches
        return self.averaged.module.eval()

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
