"""SAT under DDP: 2 gloo processes keep the same per-sample targets as 1 process on the global batch.

Each process sees half of every global batch, and a sample visits different processes in
different epochs, so each process's table must hold the other's updates too
(:class:`abstain.training.losses.SelfAdaptiveTrainingLoss` all-gathers them). Two steps on the
same 8 samples: the second reads the targets the first wrote, so the weights after it agree
only if both processes' tables agree with one process's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from abstain.training.loop import Runtime, train_step
from abstain.training.losses import build_loss
from abstain.training.model import SelectiveOutput

WORLD = 2
N = 10  # training-split size; the batch holds samples 0-7


class TinySat(nn.Module):
    """A body, f and SAT's abstain logit (no BatchNorm: per-process statistics are another matter)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.predictor, self.abstain = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> SelectiveOutput:
        h = self.body(x)
        logits = self.predictor(h)
        g = torch.full((x.shape[0],), 0.5)
        return SelectiveOutput(logits, g, logits, None, self.abstain(h).squeeze(-1))


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.arange(8)


def two_steps(model: nn.Module, x, y, index, distributed: bool) -> tuple[dict, torch.Tensor]:
    loss_fn = build_loss("sat", num_samples=N, sat_momentum=0.5, entropy_weight=0.1, distributed=distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    runtime = Runtime(
        torch.device("cpu"), amp=False, channels_last=False, world_size=WORLD if distributed else 1
    )
    for _ in range(2):
        train_step(model, loss_fn, x, y, optimizer, runtime, index)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}, loss_fn.targets.clone()


def worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        x, y, index = global_batch()
        half = slice(rank * 4, (rank + 1) * 4)
        model = nn.parallel.DistributedDataParallel(TinySat())
        weights, targets = two_steps(model, x[half], y[half], index[half], distributed=True)
        torch.save({"weights": weights, "targets": targets}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()  # see tests/training/test_ddp.py: leave without gloo's C++ destructors
    sys.stderr.flush()
    os._exit(0)


def test_two_processes_keep_the_targets_and_take_the_steps_of_one(tmp_path: Path) -> None:
    x, y, index = global_batch()
    weights, targets = two_steps(TinySat(), x, y, index, distributed=False)
    assert (targets[:8] < 1).all() and (targets[8:] == 1).all()  # 0-7 updated twice, 8-9 untouched
    out = tmp_path / "sat"
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        ddp = torch.load(f"{out}.{rank}", weights_only=True)
        # every process holds every sample's target, its own half's and the other's
        torch.testing.assert_close(ddp["targets"], targets, rtol=1e-6, atol=1e-7)
        for name, w in weights.items():
            torch.testing.assert_close(ddp["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
