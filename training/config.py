"""The training configuration (saved in every checkpoint) and the per-dataset defaults.

The paper's schedule (SGD, Nesterov 0.9, weight decay 5e-4 — PyTorch's, not Keras' l2, see
:mod:`abstain.training.defaults` —, lr 0.1 halved every 25 epochs,
300 epochs) is the default for CIFAR-100 and the image-folder datasets. The two small
datasets get shorter schedules so they finish in minutes on a 2-core CPU (timings and
accuracies: docs/training.md):

* ``digits`` (1,078 training images of 8×8): 40 epochs of 16 batches, lr 0.05 halved every
  10 epochs (step: digits' validation preferred it to cosine, benchmarks/train_digits.py); the
  paper's 300 epochs would only spend more time on a set this small.
* ``fashion-mnist`` (55,000 of 28×28): ``small_cnn`` of width 16, 12 epochs, lr 0.05 with a
  one-epoch warm-up and cosine decay (issue 19's benchmark protocol; ``--schedule step`` halves it
  every 4 epochs).

The loss defaults to ``ce`` (ranked by its softmax response): the best single model on
validation in issue 19's paired benchmark (:data:`abstain.training.defaults.DEFAULT_LOSS`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from abstain.training.defaults import (
    BODIES,
    DATASETS,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_BETA_WARMUP,
    DEFAULT_DECAY_NORM_BIAS,
    DEFAULT_ENTROPY_WEIGHT,
    DEFAULT_LAMBDA,
    DEFAULT_LOSS,
    DEFAULT_LR_GAMMA,
    DEFAULT_PRIOR,
    DEFAULT_SAT_MOMENTUM,
    DEFAULT_SAT_PRETRAIN_FRACTION,
    DEFAULT_SYNC_TERM,
    DEFAULT_TARGET_COVERAGE,
    DEFAULT_WARMUP_EPOCHS,
    DEFAULT_WEIGHT_DECAY,
    LOSSES,
    PRIOR_HEADS,
    SCHEDULES,
    SYNC_TERMS,
)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; ``None`` fields are filled from :data:`DATASET_DEFAULTS`.

    ``batch_size`` is the global batch: under DDP each of the W processes takes
    ``batch_size / W``, so the same numbers mean the same optimisation on 1 or 8 GPUs.
    """

    dataset: str = "digits"
    loss: str = DEFAULT_LOSS
    data_root: str | None = None
    download: bool = False
    body: str | None = None
    width: int | None = None
    pretrained: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    lr_step: int | None = None
    lr_gamma: float = DEFAULT_LR_GAMMA
    schedule: str | None = None  # step (lr_step, lr_gamma) or cosine (warmup_epochs); None: per dataset
    # cosine only: linear warm-up, in epochs; None: DEFAULT_WARMUP_EPOCHS, or 0 for a 1-epoch run
    warmup_epochs: int | None = None
    target_coverage: float = DEFAULT_TARGET_COVERAGE
    alpha: float = DEFAULT_ALPHA
    lam: float = DEFAULT_LAMBDA
    beta: float = DEFAULT_BETA
    prior: str = DEFAULT_PRIOR
    sync_term: str = DEFAULT_SYNC_TERM
    beta_warmup: int = DEFAULT_BETA_WARMUP
    decay_norm_bias: bool = DEFAULT_DECAY_NORM_BIAS
    train_subset: int | None = None  # first N of a fixed per-class-balanced shuffle of train
    selection_bn_gamma: float = 1.0  # initial γ of g's batch norm (SelectiveNet's reference: 0.1)
    sync_batchnorm: bool = False  # under DDP: BatchNorm statistics over the global batch (CUDA)
    # selectivenet / sync ablations (docs/training.md): g on detached features (no gradient from
    # g's terms into the body); the reference's risk mean(ℓ·g) instead of mean(ℓ·g)/φ̂
    detach_selection: bool = False
    divide_risk_by_coverage: bool = True
    # sat: Self-Adaptive Training (+ entropy minimisation)
    sat_momentum: float = DEFAULT_SAT_MOMENTUM
    sat_pretrain_epochs: int | None = None  # None: round(DEFAULT_SAT_PRETRAIN_FRACTION · epochs)
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT
    swa_epochs: int = 0  # average the weights of the last N epochs (SWA), BN re-estimated
    swa_lr: float | None = None  # a constant lr over those N epochs (None: --schedule runs to the end)
    seed: int = 0
    deterministic: bool = False
    device: str | None = None  # None: CUDA when present, else CPU
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    num_workers: int | None = None

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first invalid field; return ``self``."""
        choices = {
            "dataset": DATASETS,
            "loss": LOSSES,
            "prior": PRIOR_HEADS,
            "sync_term": SYNC_TERMS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"{name} should be one of {', '.join(valid)}, but got {getattr(self, name)!r}"
                )
        if self.body is not None and self.body not in BODIES:
            raise ValueError(f"body should be one of {', '.join(BODIES)}, but got {self.body!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule should be one of {', '.join(SCHEDULES)}, but got {self.schedule!r}")
        for name in ("epochs", "batch_size", "lr_step", "width", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} should be a positive integer, but got {value}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr should be positive, but got {self.lr}")
        if not 0.0 < self.target_coverage <= 1.0:
            raise ValueError(f"target_coverage should be in (0, 1], but got {self.target_coverage}")
        if self.beta < 0:
            raise ValueError(f"beta should be >= 0, but got {self.beta}")
        if self.beta_warmup < 0:
            raise ValueError(f"beta_warmup should be >= 0 epochs, but got {self.beta_warmup}")
        for name in ("warmup_epochs", "swa_epochs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} should be >= 0 epochs, but got {getattr(self, name)}")
        if self.sat_pretrain_epochs is not None and self.sat_pretrain_epochs < 0:
            raise ValueError(f"sat_pretrain_epochs should be >= 0, but got {self.sat_pretrain_epochs}")
        if not 0.0 <= self.sat_momentum < 1.0:
            raise ValueError(f"sat_momentum should be in [0, 1), but got {self.sat_momentum}")
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight should be >= 0, but got {self.entropy_weight}")
        if self.swa_lr is not None:
            if self.swa_lr <= 0:
                raise ValueError(f"swa_lr should be positive, but got {self.swa_lr}")
            if self.swa_epochs < 1:
                raise ValueError("swa_lr is the lr of the averaged epochs: it needs swa_epochs >= 1")
        if self.epochs is not None:
            if self.swa_epochs > self.epochs:
                raise ValueError(
                    f"swa_epochs ({self.swa_epochs}) should be at most the {self.epochs} epochs trained"
                )
            # with swa_lr the schedule runs over the epochs before the averaged ones only
            scheduled = self.epochs - self.swa_epochs if self.swa_lr is not None else self.epochs
            if self.swa_lr is not None and scheduled < 1:
                raise ValueError(
                    f"with swa_lr, swa_epochs ({self.swa_epochs}) should be fewer than the "
                    f"{self.epochs} epochs"
                )
            if self.schedule == "cosine" and (self.warmup_epochs or 0) >= scheduled:
                raise ValueError(
                    f"warmup_epochs ({self.warmup_epochs}) should be fewer than the {scheduled} epochs "
                    "the schedule runs over"
                )
        return self

    def sat_pretrain(self) -> int:
        """Epochs of plain cross-entropy before SAT's targets start (``sat_pretrain_epochs``, or
        ``round(0.3 · epochs)``, Feng et al.'s share); needs resolved ``epochs``."""
        if self.sat_pretrain_epochs is not None:
            return self.sat_pretrain_epochs
        return round(DEFAULT_SAT_PRETRAIN_FRACTION * int(self.epochs or 0))

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` hyper-parameter replaced by the dataset's default (the warm-up:
        ``DEFAULT_WARMUP_EPOCHS``, fewer when the run is shorter)."""
        defaults = DATASET_DEFAULTS[self.validate().dataset]
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        config = replace(self, **filled)
        if config.warmup_epochs is None:  # a default warm-up never makes a short run an error
            scheduled = int(config.epochs or 1) - (config.swa_epochs if config.swa_lr is not None else 0)
            config = replace(config, warmup_epochs=max(0, min(DEFAULT_WARMUP_EPOCHS, scheduled - 1)))
        if config.loss == "sat" and config.sat_pretrain_epochs is None:
            # fixed now, so the checkpoint records it and --resume --epochs does not move it
            config = replace(config, sat_pretrain_epochs=config.sat_pretrain())
        return config.validate()  # again: swa/warm-up epochs against the epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "body": "small_cnn",
        "width": 32,
        "epochs": 40,
        "batch_size": 64,
        "lr": 0.05,
        "lr_step": 10,
        "schedule": "step",
        "num_workers": 0,
    },
    "fashion-mnist": {
        "body": "small_cnn",
        "width": 16,
        "epochs": 12,
        "batch_size": 128,
        "lr": 0.05,
        "lr_step": 4,
        "schedule": "cosine",
        "num_workers": 0,
    },
    "cifar100": {
        "body": "vgg16_bn",
        "width": 32,
        "epochs": 300,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 25,
        "schedule": "step",
        "num_workers": 4,
    },
    "imagefolder": {
        "body": "resnet18",
        "width": 32,
        "epochs": 300,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 25,
        "schedule": "step",
        "num_workers": 8,
    },
}
