"""``abstain train``: the command line of the training stage.

Only typer, the standard library and :mod:`abstain.training.defaults` (names and loss
defaults, torch-free) at the top: torch is imported inside the command, so ``abstain --help``
works on a serving install without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from abstain.training import defaults as d

_DATASETS = ", ".join(d.DATASETS)
_LOSSES = ", ".join(d.LOSSES)


def train(
    dataset: Annotated[str, typer.Option(help=f"One of: {_DATASETS}.")] = "digits",
    loss: Annotated[
        str,
        typer.Option(
            help=f"One of: {_LOSSES}. `ce` (ranked by its softmax response) is the default: no other "
            "single model beat it in the paired benchmark (docs/benchmarks.md)."
        ),
    ] = d.DEFAULT_LOSS,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder for checkpoint.pt and metrics.jsonl (default: runs/<dataset>-<loss>)."
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            help="Dataset folder: fashion-mnist IDX files "
            "(default: Debian's /usr/share/datasets/fashion-mnist), cifar100's parent of "
            "cifar-100-python/, imagefolder's parent of train/ and val/."
        ),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            help="Let torchvision download fashion-mnist / cifar100 into --data-root (needs internet)."
        ),
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs (default per dataset; with --resume, the new total).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Global batch size (split across DDP processes).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Initial learning rate (SGD, Nesterov momentum 0.9).")
    ] = None,
    lr_step: Annotated[
        int | None, typer.Option(help="Multiply the lr by --lr-gamma every this many epochs.")
    ] = None,
    lr_gamma: Annotated[float, typer.Option(help="lr decay factor (paper: 0.5).")] = d.DEFAULT_LR_GAMMA,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="lr schedule: step (x --lr-gamma every --lr-step epochs; the paper's) or cosine "
            "(per-step cosine decay to 0 after a linear warm-up). Default per dataset: cosine for "
            "fashion-mnist, step for digits, cifar100 and imagefolder."
        ),
    ] = None,
    warmup_epochs: Annotated[
        int | None,
        typer.Option(
            help=f"cosine: epochs of linear lr warm-up before the decay (default: {d.DEFAULT_WARMUP_EPOCHS}, "
            "0 for a 1-epoch run)."
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay (paper: 5e-4).")] = (
        d.DEFAULT_WEIGHT_DECAY
    ),
    target_coverage: Annotated[float, typer.Option(help="SelectiveNet's target coverage c in (0, 1].")] = (
        d.DEFAULT_TARGET_COVERAGE
    ),
    alpha: Annotated[float, typer.Option(help="Weight of the selective loss vs the auxiliary head.")] = (
        d.DEFAULT_ALPHA
    ),
    lam: Annotated[float, typer.Option(help="Coverage penalty weight λ.")] = d.DEFAULT_LAMBDA,
    # "\\[": a literal bracket in rich markup
    beta: Annotated[float, typer.Option(help="SYNC weight β of BCE(g, sg\\[softmax response]).")] = (
        d.DEFAULT_BETA
    ),
    prior: Annotated[str, typer.Option(help="SYNC prior head: f (prediction) or h (auxiliary).")] = (
        d.DEFAULT_PRIOR
    ),
    sync_term: Annotated[
        str,
        typer.Option(
            help="SYNC prior term: bce (g towards the softmax response) or rank (g ordered as it; ours)."
        ),
    ] = (d.DEFAULT_SYNC_TERM),
    beta_warmup: Annotated[
        int,
        typer.Option(help="Epochs over which SYNC's β ramps up linearly (0: full β from the first epoch)."),
    ] = (d.DEFAULT_BETA_WARMUP),
    decay_norm_bias: Annotated[
        bool,
        typer.Option(
            "--decay-norm-bias/--no-decay-norm-bias",
            help="Weight decay on BatchNorm weights and biases too (SelectiveNet's reference: no).",
        ),
    ] = (d.DEFAULT_DECAY_NORM_BIAS),
    detach_selection: Annotated[
        bool,
        typer.Option(help="selectivenet/sync ablation: g reads detached features (its terms train g only)."),
    ] = False,
    divide_risk_by_coverage: Annotated[
        bool,
        typer.Option(
            "--divide-risk-by-coverage/--no-divide-risk-by-coverage",
            help="selectivenet/sync: risk mean(l*g)/coverage (paper) or mean(l*g) (Keras reference).",
        ),
    ] = True,
    sat_momentum: Annotated[
        float, typer.Option(help="sat: momentum of the per-sample EMA targets (reference: 0.9).")
    ] = d.DEFAULT_SAT_MOMENTUM,
    sat_pretrain_epochs: Annotated[
        int | None,
        typer.Option(help="sat: epochs of plain cross-entropy first (default: 30 % of --epochs)."),
    ] = None,
    entropy_weight: Annotated[
        float,
        typer.Option(
            help="sat: weight of the entropy-minimisation term (Feng et al.: 0.001, 0.01; 0 = SAT)."
        ),
    ] = d.DEFAULT_ENTROPY_WEIGHT,
    swa_epochs: Annotated[
        int,
        typer.Option(
            help="Average the weights of the last N epochs (SWA) and re-estimate BatchNorm; the "
            "checkpoint holds the average (0: off)."
        ),
    ] = 0,
    swa_lr: Annotated[
        float | None,
        typer.Option(
            help="With --swa-epochs: hold the lr at this value over the averaged epochs (SWA's schedule; "
            "--schedule then runs over the epochs before them). Default: --schedule runs to the end."
        ),
    ] = None,
    train_subset: Annotated[
        int | None,
        typer.Option(help="Train on this many images only (a fixed random subset; quick experiments)."),
    ] = None,
    selection_bn_gamma: Annotated[
        float, typer.Option(help="Initial γ of g's batch norm (SelectiveNet's reference starts at 0.1).")
    ] = 1.0,
    sync_batchnorm: Annotated[
        bool,
        typer.Option(
            help="Under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)."
        ),
    ] = False,
    body: Annotated[str | None, typer.Option(help=f"{', '.join(d.BODIES)} (default per dataset).")] = None,
    width: Annotated[int | None, typer.Option(help="Channel width of small_cnn.")] = None,
    pretrained: Annotated[
        Path | None, typer.Option(help="Local body weights (torchvision state dict); never downloaded.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (init, data order, dropout).")] = 0,
    deterministic: Annotated[
        bool, typer.Option(help="Use only deterministic kernels (slower on GPU).")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when present).")
    ] = None,
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast (default: on for CUDA).")
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="NHWC memory format for convolutions (default: on for CUDA; on 2 CPU cores it made "
            "a Fashion-MNIST small_cnn step 1.4x faster).",
        ),
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="DataLoader worker processes (default per dataset).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue OUT/checkpoint.pt (its settings; --epochs may extend it).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing OUT/checkpoint.pt instead of refusing.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per epoch.")] = True,
) -> None:
    """Train a SelectiveNet (prediction head f, selection head g, auxiliary head h).

    Writes OUT/checkpoint.pt (everything export needs) and OUT/metrics.jsonl (one line per
    epoch on val, then a last line on test with accuracy and risk at coverage).

    Example: abstain train --dataset fashion-mnist --out runs/fashion-mnist-ce

    Several GPUs or nodes: torchrun --nproc-per-node 4 -m abstain train --dataset cifar100 ...
    """
    import logging

    from abstain.training.config import TrainConfig
    from abstain.training.loop import run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TrainConfig(
        dataset=dataset,
        loss=loss,
        data_root=str(data_root) if data_root else None,
        download=download,
        body=body,
        width=width,
        pretrained=str(pretrained) if pretrained else None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        lr_step=lr_step,
        lr_gamma=lr_gamma,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
        detach_selection=detach_selection,
        divide_risk_by_coverage=divide_risk_by_coverage,
        sat_momentum=sat_momentum,
        sat_pretrain_epochs=sat_pretrain_epochs,
        entropy_weight=entropy_weight,
        swa_epochs=swa_epochs,
        swa_lr=swa_lr,
        target_coverage=target_coverage,
        alpha=alpha,
        lam=lam,
        beta=beta,
        prior=prior,
        sync_term=sync_term,
        beta_warmup=beta_warmup,
        decay_norm_bias=decay_norm_bias,
        train_subset=train_subset,
        sync_batchnorm=sync_batchnorm,
        selection_bn_gamma=selection_bn_gamma,
        seed=seed,
        deterministic=deterministic,
        device=device,
        amp=amp,
        channels_last=channels_last,
        num_workers=num_workers,
    ).validate()
    # one folder per (dataset, loss) by default, so that trying another loss never collides
    out = out if out is not None else Path("runs") / f"{dataset}-{loss}"
    run_training(config, out, resume=resume, overwrite=overwrite, progress=progress)
