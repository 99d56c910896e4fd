"""DDP optimises the loss of the global batch: 2 gloo processes (CPU) against 1 process.

SelectiveNet's φ̂ = mean g and r̂ = mean(ℓ·g) / φ̂ are ratios of batch sums. Each of two
processes holding half the batch computes its own ratio, and DDP averages the gradients of
those per-process losses, which is *not* the gradient of the global ratio. The losses built
with ``distributed=True`` all-reduce the sums (differentiably), so one training step
(:func:`abstain.training.loop.train_step`, the loop's own) on 2 processes must give the loss,
the gradients and the updated weights of 1 process on the whole batch. The same run with
``distributed=False`` must differ (the check that this test can fail).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from abstain.training.loop import Runtime, train_step
from abstain.training.losses import build_loss
from abstain.training.model import SelectiveOutput

WORLD = 2
LOSSES = ("selectivenet", "sync")


class Tiny(nn.Module):
    """Body and three heads without BatchNorm (whose per-process statistics are a separate
    matter: SyncBatchNorm, CUDA only), so only the loss decides whether DDP is exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.predictor, self.selector, self.auxiliary = nn.Linear(8, 3), nn.Linear(8, 1), nn.Linear(8, 3)
        with torch.no_grad():
            self.selector.weight.mul_(4.0)  # g far from 1/2, so the two halves' coverages differ

    def forward(self, x: torch.Tensor) -> SelectiveOutput:
        h = self.body(x)
        z = self.selector(h).squeeze(-1)
        return SelectiveOutput(self.predictor(h), torch.sigmoid(z), self.auxiliary(h), z)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 samples; the second half is shifted so that g's mean differs between the two halves
    (φ̂ = 0.64 and 0.29 at initialisation: the per-process losses' mean is 5.32, the global 4.81)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=generator)
    x[4:] -= 2.0
    return x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def one_step(
    model: nn.Module, loss_name: str, x: torch.Tensor, y: torch.Tensor, distributed: bool
) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, gradients, weights after the step) of one SGD step of ``train_step``."""
    # c = 0.95 above the batch's coverage, so the coverage penalty is active and checked too
    loss_fn = build_loss(loss_name, target_coverage=0.95, distributed=distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runtime = Runtime(
        torch.device("cpu"),
        amp=False,
        channels_last=False,
        rank=dist.get_rank() if distributed else 0,
        world_size=WORLD if distributed else 1,
    )
    result = train_step(model, loss_fn, x, y, optimizer, runtime)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    weights = {n: p.detach().clone() for n, p in inner.named_parameters()}
    return float(result.total.detach()), grads, weights


def worker(rank: int, rendezvous: str, out: str, loss_name: str, fixed: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        x, y = global_batch()
        half = slice(rank * 4, (rank + 1) * 4)
        model = nn.parallel.DistributedDataParallel(Tiny())
        loss, grads, weights = one_step(model, loss_name, x[half], y[half], distributed=fixed)
        mean_loss = torch.tensor(loss)
        dist.all_reduce(mean_loss)  # what train_one_epoch logs: the mean over the processes
        if rank == 0:
            torch.save({"loss": float(mean_loss) / WORLD, "grads": grads, "weights": weights}, out)
        dist.barrier()  # both processes reach the teardown together
    finally:
        dist.destroy_process_group()
    # torch 2.14 with gloo: a process sometimes aborts while its interpreter exits after
    # destroy_process_group ("terminate called without an active exception", SIGABRT, about one
    # run of this file in three; a barrier or deleting the DDP model first did not stop it).
    # Everything is written and torn down here, so leave without the C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ddp(tmp_path: Path, loss_name: str, fixed: bool) -> dict:
    out = tmp_path / f"{loss_name}-{fixed}.pt"
    rendezvous = tmp_path / f"rendezvous-{loss_name}-{fixed}"
    mp.spawn(worker, args=(str(rendezvous), str(out), loss_name, fixed), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_processes_take_the_step_of_one_process_on_the_global_batch(
    tmp_path: Path, loss_name: str
) -> None:
    x, y = global_batch()
    loss, grads, weights = one_step(Tiny(), loss_name, x, y, distributed=False)
    ddp = run_ddp(tmp_path, loss_name, fixed=True)
    assert ddp["loss"] == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ddp["weights"][name], weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_per_process_ratios_give_another_step(tmp_path: Path) -> None:
    # Without the global sums (the defect): another loss and other gradients than one process.
    x, y = global_batch()
    loss, grads, _ = one_step(Tiny(), "selectivenet", x, y, distributed=False)
    ddp = run_ddp(tmp_path, "selectivenet", fixed=False)
    assert abs(ddp["loss"] - loss) > 0.1
    assert max(float((ddp["grads"][n] - g).abs().max()) for n, g in grads.items()) > 1e-3
