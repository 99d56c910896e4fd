"""The training loop: ``train_one_epoch``, ``evaluate``, ``run_training`` (torchvision's reference shape).

One code path for CPU and CUDA: bf16 autocast, channels_last, pinned memory and
non-blocking copies are switched by ``enabled=``-style flags, on by default only on CUDA.
Multi-GPU / multi-node runs use PyTorch DDP under ``torchrun`` (it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); rank 0 evaluates, logs and writes files.

Outputs in ``out/``: ``checkpoint.pt`` (atomic, every epoch; see :mod:`abstain.training.checkpoint`)
and ``metrics.jsonl`` (one ``"split": "val"`` line per epoch, then one ``"split": "test"``
line at the end). Resuming from the checkpoint restores model, optimiser and scheduler; every
random stream of an epoch depends only on (seed, epoch, rank) — data order (the sampler),
augmentation in the loader's workers and in the main process, dropout — because each epoch
reseeds them (:func:`seed_epoch`), so 2 + 1 epochs equal 3 epochs, with or without workers
and on every DDP rank.

Evaluation (``predict``/``evaluate``) runs without autocast: the metrics stored in the
checkpoint, and exported with the graph, are those of the float32 model that is exported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from abstain import risk_coverage
from abstain.contract import (
    CHECKPOINT_FILENAME,
    METRICS_FILENAME,
    SCORE_NAMES,
    SCORE_SELECTION,
    SCORE_SOFTMAX_RESPONSE,
)
from abstain.io import atomic_write_text
from abstain.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from abstain.training.config import TrainConfig
from abstain.training.data import DataBundle, IndexedDataset, load_data, subset_train
from abstain.training.losses import LossOutput, SelfAdaptiveTrainingLoss, SyncLoss, build_loss
from abstain.training.model import ModelConfig, SelectiveNet, load_body_weights
from abstain.training.schedule import Schedule, build_schedule
from abstain.training.swa import WeightAverage
from abstain.version import code_version

log = logging.getLogger("training")


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes.

    Attributes:
        device: the torch device of this process.
        amp: bf16 autocast on/off (same code either way).
        channels_last: NHWC memory format for convolutions (faster with CUDA tensor cores).
        rank, world_size, local_rank: DDP coordinates (0, 1, 0 without torchrun).
    """

    device: torch.device
    amp: bool
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def setup_runtime(config: TrainConfig) -> Runtime:
    """Pick the device (CUDA when present unless overridden) and join the DDP group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; valid here: cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device should be cpu, cuda or cuda:<index>, but got {name!r}") from exc
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    cuda = device.type == "cuda"
    amp = cuda if config.amp is None else config.amp
    channels_last = cuda if config.channels_last is None else config.channels_last
    return Runtime(device, amp, channels_last, rank, world_size, local_rank)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch (CPU and CUDA); in deterministic mode, refuse non-deterministic kernels."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A seed in [0, 2**63), a pure function of (seed, epoch, rank, stream), well mixed (``SeedSequence``)."""
    words = np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Make every random stream of training epoch ``epoch`` a function of (seed, epoch, rank).

    Call before iterating ``loader`` for that epoch. It sets the sampler's epoch (the shuffle),
    reseeds the global torch RNG of this process (dropout, and augmentation when
    ``num_workers=0``) and the loader's private generator, from which each worker's seed is
    drawn when the epoch's workers start (base seed + worker id). A resumed run therefore needs
    no saved RNG state, and each DDP rank has its own streams.
    """
    if not isinstance(loader.sampler, DistributedSampler):
        raise TypeError(
            "seed_epoch needs a loader from make_loader, whose sampler is a DistributedSampler, "
            f"but got a {type(loader.sampler).__name__}"
        )
    loader.sampler.set_epoch(epoch)
    torch.manual_seed(epoch_seed(seed, epoch, rank))  # CPU and every CUDA device
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, rank, stream=1))


def make_loader(
    dataset: Dataset, batch_size: int, *, train: bool, seed: int, runtime: Runtime, num_workers: int
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch) — call :func:`seed_epoch` before each
    training epoch.

    ``DistributedSampler`` is used even on one process: it makes the shuffle a pure function
    of (seed, epoch), which is what exact resumption needs. Training drops the last partial
    batch (a batch of one breaks the selection head's BatchNorm1d).

    The training loader's workers are *not* persistent: a persistent worker seeds its RNG once,
    when it starts, so its augmentation stream would run on across epochs and a resumed run
    would restart it from the first epoch's state. Fresh workers each epoch take their seeds
    from the generator that :func:`seed_epoch` reseeds; the cost is one worker start-up per
    epoch (a fork). Evaluation loaders draw nothing at random and keep their workers.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=train, seed=seed, drop_last=False
    )
    per_process = batch_size // runtime.world_size if train else batch_size
    # A private generator: the workers' seeds never consume the global RNG (dropout's).
    generator = torch.Generator().manual_seed(epoch_seed(seed, 0, runtime.rank, stream=1))
    return DataLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=runtime.cuda,
        generator=generator,
        persistent_workers=num_workers > 0 and not train,
    )


def _autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16, enabled=runtime.amp)


def _to_device(x: torch.Tensor, y: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(runtime.device, non_blocking=runtime.cuda, memory_format=runtime.memory_format)
    return x, y.to(runtime.device, non_blocking=runtime.cuda)


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    index: torch.Tensor | None = None,
) -> LossOutput:
    """One optimisation step on this process's batch ``x [B/W, C, H, W]``, ``y [B/W]``.

    ``index`` (int64 ``[B/W]``, the samples' positions in the training split) goes to losses that
    keep per-sample state (``needs_index``: SAT).

    Under DDP (``model`` wrapped, loss built with ``distributed=True``) the W processes'
    steps together equal one step on the global batch of B (``tests/training/test_ddp.py``).
    """
    x, y = _to_device(x, y, runtime)
    with _autocast(runtime):
        output = model(x)
        result = loss_fn(output, y, index) if getattr(loss_fn, "needs_index", False) else loss_fn(output, y)
    optimizer.zero_grad(set_to_none=True)
    result.total.backward()
    optimizer.step()
    return result


def beta_scale(epoch: int, warmup: int) -> float:
    """SYNC's β multiplier in (1-based) ``epoch``: ``min(1, epoch / warmup)``, 1 without warm-up."""
    return 1.0 if warmup <= 0 else min(1.0, epoch / warmup)


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict[str, Any]]:
    """SGD parameter groups: weight decay on every parameter, or (``decay_norm_bias=False``, as
    SelectiveNet's Keras reference, which regularises only conv/dense kernels) not on the
    1-D parameters — BatchNorm scales/shifts and biases."""
    if decay_norm_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    *,
    epoch: int,
    progress: bool = True,
    schedule: Schedule | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term over batches (all processes).

    Batches are ``(x, y)`` or ``(x, y, index)`` (:class:`~abstain.training.data.IndexedDataset`).
    ``schedule``: stepped after every optimiser step when it is a per-step one (cosine).

    Forward and loss run under autocast; backward and the (single) optimiser step outside it.
    bf16 has float32's range, so no gradient scaler is needed.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not (progress and runtime.is_main))
    for batch in bar:
        x, y = batch[0], batch[1]
        index = batch[2] if len(batch) > 2 else None
        result = train_step(model, loss_fn, x, y, optimizer, runtime, index)
        if schedule is not None:
            schedule.after_step()
        for name, value in result.terms.items():
            sums[name] = sums.get(name, torch.zeros((), device=runtime.device)) + value.float()
        batches += 1
        if batches % 10 == 0:
            bar.set_postfix(loss=f"{result.terms['loss'].item():.4f}")
    if batches == 0:
        raise ValueError(
            f"the training split yields no full batch of {loader.batch_size}; lower --batch-size"
        )
    names = sorted(sums)
    means = torch.stack([sums[n] for n in names]) / batches
    if runtime.distributed:
        dist.all_reduce(means)
        means /= runtime.world_size
    return {n: float(v) for n, v in zip(names, means.tolist(), strict=True)}


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, runtime: Runtime
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits float32 [N, K], selection float32 [N], labels int64 [N])`` over ``loader``.

    Without autocast, even when ``runtime.amp``: these numbers are reported as the metrics of
    the float32 model that export writes, so they must come from float32 arithmetic.
    """
    model.eval()
    logits, selection, labels = [], [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        x, _ = _to_device(x, y, runtime)
        output = model(x)
        logits.append(output.logits.float().cpu())
        selection.append(output.selection.float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(selection).numpy(), torch.cat(labels).numpy()


def selective_metrics(
    logits: np.ndarray, selection: np.ndarray, labels: np.ndarray, score: str
) -> dict[str, Any]:
    """Accuracy, coverage and selective risk at g ≥ 0.5, risk at the table coverages and AURC.

    ``score`` ranks samples for ``risk_at_coverage`` and ``aurc`` (g for the selective losses,
    softmax response for ``ce``); AURC by both scores is reported too, for comparisons, and
    ``by_score`` holds AURC, E-AURC, AUGRC and the risk at the table coverages by every score.
    """
    errors = (logits.argmax(axis=1) != labels).astype(np.float64)  # [N] 0/1 loss
    ranking = risk_coverage.selection_scores(logits, selection, score)
    accepted = selection >= 0.5
    by_score = {}
    for name in SCORE_NAMES:  # every score, so a benchmark can choose one on validation
        s = risk_coverage.selection_scores(logits, selection, name)
        by_score[name] = {
            "aurc": risk_coverage.aurc(s, errors),
            "eaurc": risk_coverage.eaurc(s, errors),
            "augrc": risk_coverage.augrc(s, errors),
            "risk_at_coverage": risk_coverage.risk_at_coverages(s, errors),
        }
    return {
        "n": int(labels.size),
        "accuracy": float(1.0 - errors.mean()),
        "coverage": float(accepted.mean()),  # at g >= 0.5, SelectiveNet's own threshold
        "selective_risk": float(errors[accepted].mean()) if accepted.any() else None,
        "score": score,
        "risk_at_coverage": risk_coverage.risk_at_coverages(ranking, errors),
        "aurc": risk_coverage.aurc(ranking, errors),
        "aurc_by_score": {
            s: risk_coverage.aurc(risk_coverage.selection_scores(logits, selection, s), errors)
            for s in (SCORE_SELECTION, SCORE_SOFTMAX_RESPONSE)
        },
        "by_score": by_score,
    }


def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime, score: str) -> dict[str, Any]:
    """:func:`selective_metrics` of ``model`` on every sample of ``loader``."""
    return selective_metrics(*predict(model, loader, runtime), score=score)


def _unwrap(model: nn.Module) -> SelectiveNet:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, SelectiveNet):
        raise TypeError(f"expected a SelectiveNet (or one wrapped in DDP), but got {type(inner).__name__}")
    return inner


def _rng_state(runtime: Runtime) -> dict[str, Any]:
    """Rank 0's RNG state, kept in the checkpoint for the record; resuming does not need it."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if runtime.cuda:
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """The per-epoch lines of an earlier run, up to the checkpoint's epoch (later ones are replaced)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split") == "val" and r.get("epoch", 0) <= up_to_epoch]


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))


def build_model(config: TrainConfig, data: DataBundle) -> SelectiveNet:
    spec = data.input_spec
    # the ignores below: TrainConfig types body and width Optional; config.resolved() fills them
    model_config = ModelConfig(
        body=config.body,  # type: ignore[arg-type]
        num_classes=len(data.class_names),
        in_channels=spec.channels,
        image_size=spec.height,
        mean=spec.mean,
        std=spec.std,
        width=config.width,  # type: ignore[arg-type]
        selection_bn_gamma=config.selection_bn_gamma,
        # SAT: K + 1 logits in training. ce and sat are ranked (and exported) by f's softmax
        # response: their g is never trained, so a graph whose selection were g would rank by noise
        abstain_head=config.loss == "sat",
        selection_source="softmax_response" if config.loss in ("ce", "sat") else "g",
        detach_selection=config.detach_selection,
    )
    model = SelectiveNet(model_config)
    if config.pretrained:
        load_body_weights(model, Path(config.pretrained))
    return model


def run_training(
    config: TrainConfig, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate on test; return the test metrics.

    With ``resume``, every setting comes from ``out/checkpoint.pt`` except ``epochs`` when
    ``config.epochs`` is set (to extend a finished run). Without it, an existing checkpoint
    in ``out`` is an error unless ``overwrite``.
    """
    out = Path(out)
    ckpt_path, metrics_path = out / CHECKPOINT_FILENAME, out / METRICS_FILENAME
    checkpoint = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {ckpt_path}")
        checkpoint = load_checkpoint(ckpt_path)
        stored = TrainConfig.from_dict(checkpoint["train_config"])
        config = replace(stored, epochs=config.epochs or stored.epochs)
        if checkpoint.get("epoch", 0) >= config.epochs:
            raise ValueError(
                f"{ckpt_path} has already trained {checkpoint.get('epoch')} epochs; "
                f"pass --epochs larger than that to train further"
            )
    elif ckpt_path.exists() and not overwrite:
        raise FileExistsError(
            f"{ckpt_path} already exists; pass --resume to continue it or --overwrite to start again"
        )
    config = config.resolved()
    runtime = setup_runtime(config)
    seed_everything(config.seed, config.deterministic)
    data = load_data(config.dataset, Path(config.data_root) if config.data_root else None, config.download)
    if config.train_subset is not None:
        data = subset_train(data, config.train_subset)  # the fingerprint stays the full split's
    if checkpoint is not None and checkpoint.get("data_fingerprint") != data.fingerprint:
        raise ValueError(
            f"--resume: the training data differs from the one {ckpt_path} was trained on "
            f"(fingerprint {data.fingerprint} vs {checkpoint.get('data_fingerprint')}); "
            "use the same dataset and --data-root"
        )
    # the [operator] and [arg-type] ignores from here on: TrainConfig types the hyper-parameters
    # Optional, and config.resolved() above has filled every one of them
    if config.batch_size % runtime.world_size:  # type: ignore[operator]
        raise ValueError(
            f"batch_size {config.batch_size} should be divisible by the {runtime.world_size} processes"
        )

    model = build_model(config, data)  # same seed on every rank; DDP broadcasts rank 0's weights anyway
    loss_fn = build_loss(
        config.loss,
        target_coverage=config.target_coverage,
        alpha=config.alpha,
        lam=config.lam,
        beta=config.beta,
        prior=config.prior,
        sync_term=config.sync_term,
        divide_by_coverage=config.divide_risk_by_coverage,
        num_samples=len(data.train),  # type: ignore[arg-type]
        sat_momentum=config.sat_momentum,
        sat_pretrain_epochs=config.sat_pretrain(),
        entropy_weight=config.entropy_weight,
        distributed=runtime.distributed,
    )
    if config.sync_batchnorm and runtime.distributed:
        if not runtime.cuda:  # torch's SyncBatchNorm refuses CPU tensors
            raise ValueError("--sync-batchnorm needs CUDA devices; with gloo on CPU leave it off")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    score = SCORE_SOFTMAX_RESPONSE if config.loss in ("ce", "sat") else SCORE_SELECTION
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
    # torch's stubs lack the to(device, memory_format=...) form that Module.to accepts
    model.to(runtime.device, memory_format=runtime.memory_format)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.decay_norm_bias),
        lr=config.lr,  # type: ignore[arg-type]
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    workers = int(config.num_workers or 0)
    train_loader = make_loader(
        IndexedDataset(data.train) if getattr(loss_fn, "needs_index", False) else data.train,
        config.batch_size,  # type: ignore[arg-type]
        train=True,
        seed=config.seed,
        runtime=runtime,
        num_workers=workers,
    )
    schedule = build_schedule(
        optimizer,
        config.schedule,  # type: ignore[arg-type]
        epochs=config.epochs,  # type: ignore[arg-type]
        steps_per_epoch=len(train_loader),
        lr_step=config.lr_step,  # type: ignore[arg-type]
        lr_gamma=config.lr_gamma,
        warmup_epochs=config.warmup_epochs,  # type: ignore[arg-type]
        swa_epochs=config.swa_epochs,
        swa_lr=config.swa_lr,
    )
    scheduler = schedule.scheduler
    # SWA: the average of the weights at the end of each of the last swa_epochs epochs
    swa_start = config.epochs - config.swa_epochs + 1  # type: ignore[operator]
    average = WeightAverage(model) if config.swa_epochs > 0 else None
    start_epoch = 0
    records: list[dict[str, Any]] = []
    if checkpoint is not None:
        if checkpoint.get("swa", {}).get("finalized"):
            raise ValueError(
                f"{ckpt_path} is a finished SWA run: its weights are the average, not the last "
                "epoch's, so it cannot be extended; train again with a larger --epochs"
            )
        # the optimiser casts its momentum buffers to the parameters' device (already moved)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = int(checkpoint["epoch"])
        records = _read_metrics(metrics_path, start_epoch)
        if isinstance(loss_fn, SelfAdaptiveTrainingLoss) and "loss_state" in checkpoint:
            loss_fn.load_state_dict(checkpoint["loss_state"])  # SAT's per-sample EMA targets
        if average is not None and checkpoint.get("swa", {}).get("state_dict") is not None:
            average.load_state_dict(checkpoint["swa"]["state_dict"])
        # no RNG state to restore: seed_epoch reseeds every stream at the start of each epoch
    train_model: nn.Module = model
    if runtime.distributed:
        # `ce` leaves g and h without gradients, `sat` g and h: DDP must know, or it waits forever.
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[runtime.device.index] if runtime.cuda else None,
            find_unused_parameters=config.loss in ("ce", "sat") or config.detach_selection,
        )
    eval_runtime = replace(runtime, rank=0, world_size=1)  # rank 0 evaluates every sample
    val_loader = make_loader(
        data.val,
        2 * config.batch_size,  # type: ignore[operator]
        train=False,
        seed=config.seed,
        runtime=eval_runtime,
        num_workers=workers,
    )
    test_loader = make_loader(
        data.test,
        2 * config.batch_size,  # type: ignore[operator]
        train=False,
        seed=config.seed,
        runtime=eval_runtime,
        num_workers=workers,
    )
    train_config = dict(config.to_dict(), world_size=runtime.world_size)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # the [arg-type] ignore: torch's Dataset declares no __len__; a DataBundle's splits all have one
        log.info(
            "training %s on %s (%d train / %d val / %d test), loss %s, device %s%s, %d epochs",
            config.body,
            config.dataset,
            len(data.train),  # type: ignore[arg-type]
            len(data.val),  # type: ignore[arg-type]
            len(data.test),  # type: ignore[arg-type]
            config.loss,
            runtime.device,
            f" x{runtime.world_size}" if runtime.distributed else "",
            config.epochs,
        )

    def checkpoint_dict(epoch: int, metrics: dict[str, Any], swa_finalized: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if isinstance(loss_fn, SelfAdaptiveTrainingLoss):
            extra["loss_state"] = {k: v.cpu() for k, v in loss_fn.state_dict().items()}
        if average is not None:
            extra["swa"] = {
                "epochs": config.swa_epochs,
                "averaged": average.count,
                "finalized": swa_finalized,  # state_dict holds the average, BN re-estimated
                "state_dict": None if swa_finalized else average.state_dict(),
            }
        return {
            **extra,
            "format": CHECKPOINT_FORMAT,
            "model_config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "class_names": list(data.class_names),
            "input_spec": data.input_spec.to_dict(),
            "train_config": train_config,
            "data_fingerprint": data.fingerprint,
            "metrics": metrics,
            "code_version": code_version(),
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(runtime),
        }

    for epoch in range(start_epoch + 1, config.epochs + 1):  # type: ignore[operator]
        started = time.perf_counter()
        seed_epoch(train_loader, config.seed, epoch, runtime.rank)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(loss_fn, SyncLoss):  # the only loss with a β to warm up
            loss_fn.beta_scale = beta_scale(epoch, config.beta_warmup)
        if isinstance(loss_fn, SelfAdaptiveTrainingLoss):  # CE first, then SAT's targets
            loss_fn.epoch = epoch
        terms = train_one_epoch(
            train_model,
            loss_fn,
            train_loader,
            optimizer,
            runtime,
            epoch=epoch,
            progress=progress,
            schedule=schedule,
        )
        schedule.after_epoch()
        if average is not None and epoch >= swa_start:
            average.update(model)
        if runtime.is_main:
            metrics = evaluate(model, val_loader, runtime, score)
            record = {
                "split": "val",
                "epoch": epoch,
                "lr": lr,
                **{f"train_{k}": v for k, v in terms.items()},
                **metrics,
                "epoch_seconds": round(time.perf_counter() - started, 3),
            }
            records.append(record)
            save_checkpoint(ckpt_path, checkpoint_dict(epoch, record))
            _write_metrics(metrics_path, records)
            risk = record["selective_risk"]
            log.info(
                "epoch %d/%d lr %.4g loss %.4f | val acc %.4f cov@g>=0.5 %.3f risk@g>=0.5 %s "
                "aurc %.4f | %.1fs",
                epoch,
                config.epochs,
                lr,
                terms["loss"],
                record["accuracy"],
                record["coverage"],
                "n/a" if risk is None else f"{risk:.4f}",
                record["aurc"],
                record["epoch_seconds"],
            )
        if runtime.distributed:
            dist.barrier()  # the others wait for rank 0's evaluation and checkpoint

    if average is not None:
        # BN statistics of the averaged weights, from one pass over the training data with its
        # own random stream (epoch "epochs + 1"); every rank computes them, rank 0's are saved
        seed_epoch(train_loader, config.seed, config.epochs + 1, runtime.rank)  # type: ignore[operator]
        averaged = average.finalize(train_loader, runtime.device)
        model.load_state_dict(averaged.state_dict())  # export and evaluation use the average
        log.info("SWA: averaged the weights of the last %d epochs, BatchNorm re-estimated", average.count)
    test_metrics: dict[str, Any] = {}
    if runtime.is_main:
        test_metrics = {
            "split": "test",
            "epoch": config.epochs,
            **evaluate(model, test_loader, runtime, score),
        }
        records.append(test_metrics)
        save_checkpoint(
            ckpt_path,
            checkpoint_dict(config.epochs, test_metrics, swa_finalized=True),  # type: ignore[arg-type]
        )
        _write_metrics(metrics_path, records)
        log.info(
            "test acc %.4f, risk@80%% coverage %.4f, aurc %.4f (by %s); wrote %s and %s",
            test_metrics["accuracy"],
            test_metrics["risk_at_coverage"]["0.8"],
            test_metrics["aurc"],
            score,
            ckpt_path,
            metrics_path,
        )
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return test_metrics
