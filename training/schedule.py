"""Learning-rate schedules: SelectiveNet's step decay, or cosine decay after a linear warm-up.

* ``step`` (SelectiveNet's CIFAR schedule, Geifman & El-Yaniv 2019: lr × 0.5 every
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

With ``swa_lr`` (and N = ``swa_epochs``), the schedule is SWA's (Izmailov et al., UAI 2018, §3.2):
the chosen schedule runs over the first ``epochs − N`` epochs (T = that many epochs' steps), then the
lr is held constant at ``swa_lr`` for the N epochs whose weights are averaged, so that the averaged
snapshots differ (under plain cosine the last epochs run at an lr near 0 and barely move). Both
schedules are then a ``LambdaLR`` (per step for cosine, per epoch for step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from abstain.training.defaults import SCHEDULES


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The cosine schedule's lr multiplier at optimiser step ``step`` (0-based); see the module."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def step_factor(epoch: int, lr_step: int, gamma: float) -> float:
    """Step decay's lr multiplier in epoch ``epoch`` (0-based): γ^⌊epoch / lr_step⌋, as ``StepLR``."""
    return gamma ** (epoch // lr_step)


def with_swa_tail(index: int, main: int, tail: float, before: Callable[[int], float]) -> float:
    """``before(index)`` for the first ``main`` steps (or epochs), then the constant ``tail``."""
    return before(index) if index < main else tail


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
    swa_epochs: int = 0,
    swa_lr: float | None = None,
) -> Schedule:
    """The :class:`Schedule` called ``name`` (one of :data:`SCHEDULES`) for ``optimizer``; with
    ``swa_lr``, a constant ``swa_lr`` over the last ``swa_epochs`` epochs (see the module)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule should be one of {', '.join(SCHEDULES)}, but got {name!r}")
    if swa_lr is None:
        if name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)
            return Schedule(scheduler, False)
        warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
        lam = lambda step: cosine_factor(step, warmup, total)  # noqa: E731 (LambdaLR takes a callable)
        return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, lam), True)
    # LambdaLR multiplies each group's initial lr: the SWA tail is the factor swa_lr / lr
    main_epochs = epochs - swa_epochs
    factors: list[Callable[[int], float]]
    if name == "step":  # counted in epochs
        factors = [
            partial(
                with_swa_tail,
                main=main_epochs,
                tail=swa_lr / group["lr"],
                before=partial(step_factor, lr_step=lr_step, gamma=lr_gamma),
            )
            for group in optimizer.param_groups
        ]
        return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factors), False)
    warmup, main = warmup_epochs * steps_per_epoch, main_epochs * steps_per_epoch
    cosine = partial(cosine_factor, warmup_steps=warmup, total_steps=main)
    factors = [
        partial(with_swa_tail, main=main, tail=swa_lr / group["lr"], before=cosine)
        for group in optimizer.param_groups
    ]
    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factors), True)
