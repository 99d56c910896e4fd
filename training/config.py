"""The training configuration (saved in every checkpoint) and the per-dataset defaults.

The paper's schedule (SGD, Nesterov 0.9, weight decay 5e-4 — PyTorch's, not Keras' l2, see
:mod:`abstain.training.defaults` —, lr 0.1 halved every 25 epochs,
300 epochs) is the default for CIFAR-100 and the image-folder datasets. The two small
datasets get shorter schedules so they finish in minutes on a 2-core CPU (timings and
accuracies: docs/training.md):

* ``digits`` (1,078 training images of 8×8): 40 epochs of 16 batches, lr 0.05 halved every
  10 epochs; the paper's 300 epochs would only spend more time on a set this small.
* ``fashion-mnist`` (55,000 of 28×28): ``small_cnn`` of width 16, 12 epochs, lr 0.05 halved
  every 4 epochs.
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
    DEFAULT_LAMBDA,
    DEFAULT_LR_GAMMA,
    DEFAULT_PRIOR,
    DEFAULT_SYNC_TERM,
    DEFAULT_TARGET_COVERAGE,
    DEFAULT_WEIGHT_DECAY,
    LOSSES,
    PRIOR_HEADS,
    SYNC_TERMS,
)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; ``None`` fields are filled from :data:`DATASET_DEFAULTS`.

    ``batch_size`` is the global batch: under DDP each of the W processes takes
    ``batch_size / W``, so the same numbers mean the same optimisation on 1 or 8 GPUs.
    """

    dataset: str = "digits"
    loss: str = "sync"
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
    seed: int = 0
    deterministic: bool = False
    device: str | None = None  # None: CUDA when present, else CPU
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    num_workers: int | None = None

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first invalid field; return ``self``."""
        choices = {"dataset": DATASETS, "loss": LOSSES, "prior": PRIOR_HEADS, "sync_term": SYNC_TERMS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"{name} should be one of {', '.join(valid)}, but got {getattr(self, name)!r}"
                )
        if self.body is not None and self.body not in BODIES:
            raise ValueError(f"body should be one of {', '.join(BODIES)}, but got {self.body!r}")
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
        return self

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` hyper-parameter replaced by the dataset's default."""
        defaults = DATASET_DEFAULTS[self.validate().dataset]
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **filled)

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
        "num_workers": 0,
    },
    "fashion-mnist": {
        "body": "small_cnn",
        "width": 16,
        "epochs": 12,
        "batch_size": 128,
        "lr": 0.05,
        "lr_step": 4,
        "num_workers": 0,
    },
    "cifar100": {
        "body": "vgg16_bn",
        "width": 32,
        "epochs": 300,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 25,
        "num_workers": 4,
    },
    "imagefolder": {
        "body": "resnet18",
        "width": 32,
        "epochs": 300,
        "batch_size": 128,
        "lr": 0.1,
        "lr_step": 25,
        "num_workers": 8,
    },
}
