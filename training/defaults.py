"""The training stage's names and loss defaults, once, with no torch import.

``abstain train``'s options (:mod:`abstain.training.cli`, which must load without torch so that
``abstain --help`` works on a serving install), :class:`abstain.training.config.TrainConfig`
and the losses (:mod:`abstain.training.losses`) all read them from here.
"""

from __future__ import annotations

DATASETS = ("digits", "fashion-mnist", "cifar100", "imagefolder")
#: ``sat``: Self-Adaptive Training's selective loss (Huang et al., NeurIPS 2020), optionally with
#: entropy minimisation (Feng et al., ICLR 2023); ranked by the softmax response of f.
LOSSES = ("ce", "selectivenet", "sync", "sat")
#: ``abstain train``'s loss when none is named: plain cross-entropy, ranked by its softmax
#: response (CE-SR). Issue 19's paired benchmark (benchmarks/quality.py, Fashion-MNIST, 12 epochs,
#: 4 seeds; docs/benchmarks.md "Quality: every method against CE-SR") found no single model that
#: beats CE-SR (SAT+EM, CE+SWA, SYNC and SelectiveNet all lost on average), and CE-SR had the best
#: validation AURC of the single models, so it is the default: the best found, not a proven winner.
DEFAULT_LOSS = "ce"
BODIES = ("small_cnn", "vgg16_bn", "resnet18", "resnet34")
PRIOR_HEADS = ("f", "h")
#: How SYNC's prior enters the loss: ``bce`` (g pulled towards the softmax response) or
#: ``rank`` (our second reading: g's logits ordered as the softmax responses, pairwise).
SYNC_TERMS = ("bce", "rank")

#: Defaults of SelectiveNet's paper (Geifman & El-Yaniv, ICML 2019): α weighs the selective
#: loss against the auxiliary head, λ the coverage penalty, c the target coverage.
DEFAULT_ALPHA = 0.5
DEFAULT_LAMBDA = 32.0
DEFAULT_TARGET_COVERAGE = 0.8
#: Our SYNC formulation (arXiv 2602.11316): β weighs BCE(g, sg[softmax response of the prior
#: head]). β = 0.1 is the best SYNC point of the 3-seed quality sweep (benchmarks/quality.py
#: --mode sweep, chosen on validation AURC; docs/benchmarks.md "Quality: the SYNC sweep"), in its
#: reduced Fashion-MNIST setting (20k images, 4 epochs); larger β cost accuracy there (β = 8
#: diverged). No SYNC point beat the plain classifier's softmax response by more than the
#: seed spread, so this is the best SYNC found, not a proven winner (docs/training.md).
DEFAULT_BETA = 0.1
DEFAULT_PRIOR = "f"
DEFAULT_SYNC_TERM = "bce"
#: Epochs over which SYNC's β ramps linearly from β/warmup to β (0: the full β from the start).
DEFAULT_BETA_WARMUP = 0
#: SGD, as the paper: lr decay factor and weight decay. PyTorch's ``weight_decay`` adds wd·w to
#: the gradient; the Keras reference's ``l2(5e-4)`` adds 5e-4·Σw² to the loss, i.e. 1e-3·w to
#: the gradient, and only on conv/dense kernels (see DEFAULT_DECAY_NORM_BIAS).
DEFAULT_LR_GAMMA = 0.5
DEFAULT_WEIGHT_DECAY = 5e-4
#: Weight decay on BatchNorm weights and on biases too (SelectiveNet's Keras reference decays
#: only conv/dense kernels; off = the reference's choice).
DEFAULT_DECAY_NORM_BIAS = True

#: Learning-rate schedules: ``step`` (lr × γ every ``lr_step`` epochs: SelectiveNet's CIFAR
#: schedule) or ``cosine`` (per-step cosine decay to 0 after a linear warm-up). The default is
#: per dataset (:data:`abstain.training.config.DATASET_DEFAULTS`): cosine for Fashion-MNIST (issue
#: 19's benchmark protocol), step for digits (validation preferred it: benchmarks/train_digits.py)
#: and, the paper's, for CIFAR-100 and image folders.
SCHEDULES = ("step", "cosine")
#: Linear warm-up of the cosine schedule, in epochs (ignored by ``step``).
DEFAULT_WARMUP_EPOCHS = 1
#: Self-Adaptive Training (Huang et al. 2020; github.com/LayneH/SAT-selective-cls, and Feng et
#: al. 2023's github.com/BorealisAI/towards-better-sel-cls): momentum of the per-sample EMA
#: target (both references: ``--sat-momentum 0.9``) and the share of epochs trained with plain
#: cross-entropy first (Feng et al.'s scripts: 60 of 300 epochs on CIFAR-10, 150 of 500 on
#: ImageNet-100; 30 % here, as the issue).
DEFAULT_SAT_MOMENTUM = 0.9
DEFAULT_SAT_PRETRAIN_FRACTION = 0.3
#: Weight of the entropy term of SAT + EM (Feng et al. use 0.001 and 0.01; 0: plain SAT).
DEFAULT_ENTROPY_WEIGHT = 0.0
