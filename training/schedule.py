"""Learning-rate schedules: SelectiveNet's step decay, or cosine decay after a linear warm-up.

* ``step`` (the default; SelectiveNet's CIFAR schedule, Geifman & El-Yaniv 2019: lr × 0.5 every
  25 epochs): ``torch.optim.lr_scheduler.StepLR``, stepped once per **epoch**.
* ``cosine`` (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts; the linear warm-up of
  Goyal et al. 2017): a ``LambdaLR`` stepped once per **optimiser step**, so the decay is smooth
  within an epoch and a one-epoch warm-up is not one flat epoch. With W warm-up steps and T
  steps in all, the lr of optimiser step t (0-based) is::

      lr_t = base · (t + 1) / W                                 t < W
      lr_t = base · ½ · (1 + cos(π · (t − W) / (T − W)))        W ≤ t < T

  ``t + 1`` so that the first step does not run at lr 0; the last step runs just above 0.
  W = ``warmup_epochs`` × steps per epoch, T = ``epochs`` × steps per epoch. Extending a cosine
  run with ``--resume --epochs`` stretches T, so the lr jumps up to the new curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from abstain.training.defaults import SCHEDULES


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The cosine schedule's lr multiplier at optimiser step ``step`` (0-based); see the module."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


@dataclass
class Schedule:
    """A scheduler and when to step it: after every optimiser step, or after every epoch."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_step: bool

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if not self.per_step:
            self.scheduler.step()


def build_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    lr_step: int,
    lr_gamma: float,
    warmup_epochs: int,
) -> Schedule:
    """The :class:`Schedule` called ``name`` (one of :data:`SCHEDULES`) for ``optimizer``."""
    if name == "step":
        return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma), False)
    if name == "cosine":
        warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
        lam = lambda step: cosine_factor(step, warmup, total)  # noqa: E731 (LambdaLR takes a callable)
        return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, lam), True)
    raise ValueError(f"schedule should be one of {', '.join(SCHEDULES)}, but got {name!r}")
