"""Training losses: plain cross-entropy, SelectiveNet, and SYNC (SelectiveNet + selective prior).

Each loss is a small ``nn.Module`` whose ``forward(output, target)`` takes the model's
:class:`~abstain.training.model.SelectiveOutput` (``logits [B, K]``, ``selection [B]``,
``aux_logits [B, K]``) and the labels ``target`` int64 ``[B]`` and returns a :class:`LossOutput`:
the scalar to back-propagate plus each term, detached, for logging.

All arithmetic is done in float32 whatever the autocast dtype (a ratio of means, SelectiveNet's
risk, loses precision in bf16), and only with autocast-safe ops: CUDA autocast refuses
``F.binary_cross_entropy`` whatever its inputs' dtype ("unsafe to autocast"; CPU autocast
accepts it, so a CPU run cannot show it), so SYNC's BCE is computed from g's logit with
``binary_cross_entropy_with_logits``. ``tests/training/test_losses.py`` replays the ops of a
training step through PyTorch's CUDA-autocast kernels, on CPU.

References:
    Geifman & El-Yaniv, "SelectiveNet: A Deep Neural Network with an Integrated Reject
    Option", ICML 2019 (eq. 2-4: empirical selective risk, coverage penalty, auxiliary head).
    Mishra, Li, Mishra, Xiong, "Selective Prior Synchronization via SYNC Loss",
    arXiv 2602.11316 (2026): feed the softmax response into SelectiveNet's training. Its
    exact formula is not public to us; :class:`SyncLoss` is *our* formulation.

Data parallelism: φ̂ and r̂ are ratios of batch sums, and a mean of per-process ratios is not
the ratio of the global sums. With ``distributed=True`` the sums Σg and Σℓ·g are summed over
the processes by a *differentiable* all-reduce (``torch.distributed.nn.functional.all_reduce``,
whose backward all-reduces the gradient), so every process computes the global φ̂, r̂ and
penalty; the per-sample means (auxiliary CE, SYNC's BCE) stay local, since DDP's gradient
average of equal-sized local means is the global mean's gradient. W processes with B/W
samples each then follow the gradient of one process with the global batch of B
(``tests/training/test_ddp.py``). The ``rank`` term's pairs stay within each process's batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

# names and defaults live in the torch-free module the CLI reads (one source of truth)
from abstain.training.defaults import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_ENTROPY_WEIGHT,
    DEFAULT_LAMBDA,
    DEFAULT_PRIOR,
    DEFAULT_SAT_MOMENTUM,
    DEFAULT_SYNC_TERM,
    DEFAULT_TARGET_COVERAGE,
    LOSSES,
    PRIOR_HEADS,
    SYNC_TERMS,
)
from abstain.training.model import SelectiveOutput

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_LAMBDA",
    "DEFAULT_PRIOR",
    "DEFAULT_TARGET_COVERAGE",
    "LOSSES",
    "PRIOR_HEADS",
    "build_loss",
]


class LossOutput(NamedTuple):
    """A loss value and its parts.

    Attributes:
        total: scalar tensor to back-propagate (keeps its graph).
        terms: name → detached scalar tensor, for logging (always includes ``"loss"``).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def _check_batch(output: SelectiveOutput, target: torch.Tensor) -> None:
    """Reject shapes that would broadcast silently (the classic ``(B,) * (B, 1) → (B, B)`` bug)."""
    b = target.shape[0]
    if target.ndim != 1:
        raise ValueError(f"target should be class indices [B], but got shape {tuple(target.shape)}")
    if output.logits.ndim != 2 or output.logits.shape[0] != b:
        raise ValueError(f"logits should be [B={b}, K], but got shape {tuple(output.logits.shape)}")
    if output.selection.shape != (b,):
        raise ValueError(
            f"selection should be [B={b}] (squeeze the [B, 1] head output), "
            f"but got shape {tuple(output.selection.shape)}"
        )


def _global_sum(value: torch.Tensor, distributed: bool) -> torch.Tensor:
    """``value`` summed over the DDP processes, differentiably (itself on one process)."""
    if not distributed:
        return value
    from torch.distributed.nn.functional import all_reduce  # imported on use: needs a process group

    return all_reduce(value, op=dist.ReduceOp.SUM)


def _check_probability(name: str, value: float, *, low_open: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} should be in {interval}, but got {value}")


class CrossEntropyLoss(nn.Module):
    """``ce``: L = CE(f(x), y), mean over the batch — the softmax-response baseline.

    Only the prediction head is trained; g and h receive no gradient (so DDP must be told
    about unused parameters). Ranking at test time is by softmax response max_k softmax(f)_k.
    """

    def forward(self, output: SelectiveOutput, target: torch.Tensor) -> LossOutput:
        _check_batch(output, target)
        loss = F.cross_entropy(output.logits.float(), target)
        return LossOutput(loss, {"loss": loss.detach(), "ce": loss.detach()})


class SelectiveNetLoss(nn.Module):
    """``selectivenet``: SelectiveNet's objective (Geifman & El-Yaniv, ICML 2019, eq. 2-4).

    With ``ℓ_i = CE(f(x_i), y_i)`` ``[B]`` and ``g_i`` ``[B]``::

        φ̂ = mean_i g_i                                  (empirical coverage)
        r̂ = mean_i(ℓ_i · g_i) / φ̂                       (empirical selective risk)
        L_sel = r̂ + λ · max(0, c − φ̂)²                  (coverage penalty, one-sided)
        L = α · L_sel + (1 − α) · mean_i CE(h(x_i), y_i)  (auxiliary head h)

    Args:
        target_coverage: c in (0, 1].
        alpha: α in [0, 1] (paper: 0.5).
        lam: λ ≥ 0 (paper: 32).
        divide_by_coverage: ``True`` (the paper's eq. 2): ``r̂ = mean(ℓ·g) / φ̂``. ``False``: the
            Keras reference's ``r̂ = mean(ℓ·g)`` (github.com/geifmany/selectivenet: Keras'
            categorical cross-entropy of the target ``g·onehot``, averaged over the batch, has
            no division by the coverage) — an ablation flag.
        distributed: under DDP, compute φ̂ and r̂ from the sums over all processes (see the
            module docstring); every process must then call the loss on every step.
    """

    def __init__(
        self,
        target_coverage: float = DEFAULT_TARGET_COVERAGE,
        alpha: float = DEFAULT_ALPHA,
        lam: float = DEFAULT_LAMBDA,
        *,
        divide_by_coverage: bool = True,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        _check_probability("target_coverage", target_coverage, low_open=True)
        _check_probability("alpha", alpha)
        if lam < 0:
            raise ValueError(f"lam (λ) should be >= 0, but got {lam}")
        self.target_coverage, self.alpha, self.lam = float(target_coverage), float(alpha), float(lam)
        self.distributed = bool(distributed)
        self.divide_by_coverage = bool(divide_by_coverage)

    def forward(self, output: SelectiveOutput, target: torch.Tensor) -> LossOutput:
        _check_batch(output, target)
        ce_f = F.cross_entropy(output.logits.float(), target, reduction="none")  # [B]
        g = output.selection.float()  # [B]
        # [B]·[B]: shapes checked above, no broadcasting. Sums over the global batch under DDP.
        sums = _global_sum(torch.stack([g.sum(), (ce_f * g).sum()]), self.distributed)  # [2]
        n = target.shape[0] * (dist.get_world_size() if self.distributed else 1)
        coverage = sums[0] / n
        risk = sums[1] / sums[0] if self.divide_by_coverage else sums[1] / n
        penalty = self.lam * torch.clamp(self.target_coverage - coverage, min=0.0) ** 2
        aux = F.cross_entropy(output.aux_logits.float(), target)
        total = self.alpha * (risk + penalty) + (1.0 - self.alpha) * aux
        terms = {
            "loss": total,
            "selective_risk": risk,
            "coverage": coverage,
            "coverage_penalty": penalty,
            "aux_ce": aux,
        }
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})


class SyncLoss(nn.Module):
    """``sync``: SelectiveNet plus the selective prior (our formulation of arXiv 2602.11316).

        With ``s_i = max_k softmax(p(x_i))_k`` the softmax response of the prior head ``p``
        (f by default, h selectable) and ``sg`` the stop-gradient::

            L_SYNC = L_SN + β · mean_i BCE(g_i, sg[s_i])
            BCE(g, s) = −(s · log g + (1 − s) · log(1 − g))
                      = softplus(z) − s · z          with g = sigmoid(z)

    The second form, on g's pre-sigmoid output z (``SelectiveOutput.selection_logit``), is what
    is computed (``binary_cross_entropy_with_logits``, float32): it is exact where g rounds to 0
    or 1, its gradient in z is ``g − s`` (never vanishing), and it is autocast-safe. For an
    output built without ``selection_logit``, z = logit(clamp(g, ε, 1 − ε)) with ε = 1e-6.

        The extra term pulls g towards the classifier's own confidence, so g learns to rank
        samples by how likely f is to be right, not only to meet the coverage target. The
        stop-gradient keeps the prior from being pushed towards g. β = 0 gives exactly
        :class:`SelectiveNetLoss`.

        ``term="rank"`` is a second reading of "the softmax response as a selective prior", also
        ours: only the *order* of the prior is imposed on g, not its values. Over the pairs of the
        batch, with weights ``w_ij = max(0, s_i − s_j)`` (pairs the prior barely separates count
        little)::

            L_rank = Σ_ij w_ij · softplus(z_j − z_i) / Σ_ij w_ij     (RankNet's logistic pair loss)

        so g keeps its own scale (the coverage penalty sets it) while ranking as the prior does.

        ``beta_scale`` (set by the loop each epoch, for a warm-up of β) multiplies β.
    """

    def __init__(
        self,
        target_coverage: float = DEFAULT_TARGET_COVERAGE,
        alpha: float = DEFAULT_ALPHA,
        lam: float = DEFAULT_LAMBDA,
        beta: float = DEFAULT_BETA,
        prior: str = DEFAULT_PRIOR,
        term: str = DEFAULT_SYNC_TERM,
        *,
        divide_by_coverage: bool = True,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta (β) should be >= 0, but got {beta}")
        if prior not in PRIOR_HEADS:
            raise ValueError(f"prior should be one of {', '.join(PRIOR_HEADS)}, but got {prior!r}")
        if term not in SYNC_TERMS:
            raise ValueError(f"term should be one of {', '.join(SYNC_TERMS)}, but got {term!r}")
        self.selectivenet = SelectiveNetLoss(
            target_coverage, alpha, lam, divide_by_coverage=divide_by_coverage, distributed=distributed
        )
        self.beta, self.prior, self.term = float(beta), prior, term
        self.beta_scale = 1.0

    def forward(self, output: SelectiveOutput, target: torch.Tensor) -> LossOutput:
        base = self.selectivenet(output, target)
        prior_logits = output.logits if self.prior == "f" else output.aux_logits
        with torch.no_grad():  # sg[·]: the prior is a target, not something to move
            prior = torch.softmax(prior_logits.float(), dim=1).amax(dim=1)  # [B]
        z = _selection_logit(output)
        if self.term == "bce":
            sync = F.binary_cross_entropy_with_logits(z, prior)
        else:
            sync = _pairwise_rank_loss(z, prior)
        total = base.total + self.beta * self.beta_scale * sync
        terms = dict(base.terms, loss=total.detach(), **{f"sync_{self.term}": sync.detach()})
        return LossOutput(total, terms)


class SelfAdaptiveTrainingLoss(nn.Module):
    """``sat``: Self-Adaptive Training's selective loss (Huang, Zhang & Zhang, NeurIPS 2020), with
    Feng et al.'s entropy minimisation (ICLR 2023, "Towards Better Selective Classification").

    The model has K + 1 outputs in training: f's logits ``z [B, K]`` and an abstain logit
    ``a [B]`` (``SelectiveOutput.abstain_logit``). Every training sample i keeps a target
    ``t_i`` (an EMA of f's probability of its label), and with ``q = log_softmax([z, a]) [B, K+1]``
    and ``p = softmax(z) [B, K]``::

        epochs ≤ pretrain:  L = mean_i CE(z_i, y_i)                       (the K class logits only)
        afterwards:         t_i ← m · t_i + (1 − m) · sg[p_i,y_i]         (t_i = 1 before its first update)
                            L = mean_i −(t_i · q_i,y_i + (1 − t_i) · q_i,K) + w · mean_i H(p_i)
                            H(p) = −Σ_k p_k log p_k

    The first line of the SAT phase is the references' ``prob_history`` update
    (github.com/LayneH/SAT-selective-cls and github.com/BorealisAI/towards-better-sel-cls,
    ``loss.py``) restricted to the label's column, the only one their soft label reads (its
    label column ``t_y``, its abstain column ``1 − t_y``, all others 0, L1-normalised — already
    sums to 1); so one float per sample is kept, not K. Confident-and-right samples keep t near 1
    and are learnt as usual; samples f keeps getting wrong move their target mass to the abstain
    column. Selection at test time is the softmax response of z (Feng et al.: it beats the
    abstain logit), which is what the model reports (``ModelConfig.selection_source``).

    Entropy: Feng et al.'s code adds ``w · mean(−Σ_k p_k z_k)``, which is ``H(p) − logsumexp(z)``,
    not the entropy their paper writes; we use the paper's ``H(p)`` (docs/training.md).

    Args:
        num_samples: N, the training split's size; ``forward`` takes each sample's index in [0, N).
        momentum: m in [0, 1) (references: 0.9).
        pretrain_epochs: epochs of plain CE first (the loop sets :attr:`epoch`, 1-based).
        entropy_weight: w ≥ 0 (Feng et al.: 0.001 or 0.01; 0 is plain SAT).
        distributed: under DDP a sample visits different processes in different epochs, so every
            process must hold every target: each step all-gathers the batch's indices and label
            probabilities and applies all W processes' updates to every process's table (a few
            bytes per sample). The loss itself is a per-sample mean, local as DDP expects.

    The targets are buffers (``state_dict``), kept on the CPU and saved in the checkpoint, so a
    resumed run continues them.
    """

    targets: torch.Tensor  # [N] float32, t_i
    seen: torch.Tensor  # [N] bool, whether t_i has been updated once
    needs_index = True  # the loop passes each sample's index in the training split (IndexedDataset)

    def __init__(
        self,
        num_samples: int,
        *,
        momentum: float = DEFAULT_SAT_MOMENTUM,
        pretrain_epochs: int = 0,
        entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples should be positive, but got {num_samples}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum should be in [0, 1), but got {momentum}")
        if pretrain_epochs < 0 or entropy_weight < 0:
            raise ValueError(
                "pretrain_epochs and entropy_weight should be >= 0, "
                f"but got {pretrain_epochs} and {entropy_weight}"
            )
        self.momentum, self.pretrain_epochs = float(momentum), int(pretrain_epochs)
        self.entropy_weight = float(entropy_weight)
        self.distributed = bool(distributed)
        self.register_buffer("targets", torch.ones(num_samples))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))
        self.epoch = 1  # set by the training loop before each epoch

    def forward(self, output: SelectiveOutput, target: torch.Tensor, index: torch.Tensor) -> LossOutput:
        """``index`` int64 ``[B]``: the batch's positions in the training split."""
        _check_batch(output, target)
        logits = output.logits.float()  # [B, K]
        if self.epoch <= self.pretrain_epochs:
            ce = F.cross_entropy(logits, target)
            return LossOutput(ce, {"loss": ce.detach(), "ce": ce.detach()})
        if output.abstain_logit is None or output.abstain_logit.shape != target.shape:
            raise ValueError(
                "loss sat needs the abstain logit [B] (a model built with ModelConfig(abstain_head=True))"
            )
        if index.shape != target.shape:
            raise ValueError(f"index should be [B={target.shape[0]}], but got {tuple(index.shape)}")
        rows = torch.arange(target.shape[0], device=logits.device)
        with torch.no_grad():  # the target is sg[·], as the references' logits.detach()
            p_label = torch.softmax(logits, dim=1)[rows, target]  # [B]
            all_index, all_p, mine = self._gather(index.to(logits.device), p_label)
            previous = torch.where(self.seen[all_index], self.targets[all_index], torch.ones_like(all_p))
            updated = self.momentum * previous + (1.0 - self.momentum) * all_p
            self.targets[all_index] = updated
            self.seen[all_index] = True
        t = updated[mine].to(logits.device)  # [B], this process's samples
        full = torch.cat([logits, output.abstain_logit.float()[:, None]], dim=1)  # [B, K+1]
        log_q = F.log_softmax(full, dim=1)
        sat = -(t * log_q[rows, target] + (1.0 - t) * log_q[:, -1]).mean()
        log_p = F.log_softmax(logits, dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
        total = sat + self.entropy_weight * entropy
        terms = {"loss": total, "sat": sat, "entropy": entropy, "sat_target": t.mean()}
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})

    def _gather(self, index: torch.Tensor, p_label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """(indices, label probabilities) of every process's batch, on the CPU, and the slice that
        is this process's. One process: its own. Under DDP every batch has the same size (the
        training loader drops the last partial batch), so ``all_gather`` needs no padding."""
        if not self.distributed:
            return index.cpu(), p_label.cpu(), slice(None)
        world, rank, b = dist.get_world_size(), dist.get_rank(), index.shape[0]
        indices = [torch.empty_like(index) for _ in range(world)]
        probs = [torch.empty_like(p_label) for _ in range(world)]
        dist.all_gather(indices, index)  # on the loss's device: NCCL needs CUDA tensors
        dist.all_gather(probs, p_label)
        return torch.cat(indices).cpu(), torch.cat(probs).cpu(), slice(rank * b, (rank + 1) * b)


def _pairwise_rank_loss(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``Σ_ij w_ij softplus(z_j − z_i) / Σ_ij w_ij`` with ``w_ij = max(0, s_i − s_j)``; z, s ``[B]``.

    0 when the batch's prior has no two distinct values (nothing to order).
    """
    weights = torch.clamp(prior[:, None] - prior[None, :], min=0.0)  # [B, B], w_ij > 0 iff s_i > s_j
    pair_loss = F.softplus(z[None, :] - z[:, None])  # [B, B]: softplus(z_j − z_i)
    return (weights * pair_loss).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


#: Clamp of g before taking its logit when an output carries no ``selection_logit``.
_LOGIT_EPS = 1e-6


def _selection_logit(output: SelectiveOutput) -> torch.Tensor:
    """g's logit z ``[B]`` in float32: the model's own when it gave one, else logit(clamped g)."""
    if output.selection_logit is not None:
        if output.selection_logit.shape != output.selection.shape:
            raise ValueError(
                f"selection_logit should have the shape of selection "
                f"{tuple(output.selection.shape)}, "
                f"but got {tuple(output.selection_logit.shape)}"
            )
        return output.selection_logit.float()
    return torch.logit(output.selection.float(), eps=_LOGIT_EPS)


def build_loss(
    name: str,
    *,
    target_coverage: float = DEFAULT_TARGET_COVERAGE,
    alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAMBDA,
    beta: float = DEFAULT_BETA,
    prior: str = DEFAULT_PRIOR,
    sync_term: str = DEFAULT_SYNC_TERM,
    divide_by_coverage: bool = True,
    num_samples: int | None = None,
    num_classes: int | None = None,
    sat_momentum: float = DEFAULT_SAT_MOMENTUM,
    sat_pretrain_epochs: int = 0,
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
    distributed: bool = False,
) -> nn.Module:
    """The loss called ``name`` (one of :data:`LOSSES`) with its hyper-parameters.

    ``distributed``: the loss runs under DDP with a process group (see the module docstring).
    ``sat`` needs ``num_samples`` (the training split's size: one EMA target per sample).
    """
    if name == "ce":
        return CrossEntropyLoss()
    if name == "selectivenet":
        return SelectiveNetLoss(
            target_coverage, alpha, lam, divide_by_coverage=divide_by_coverage, distributed=distributed
        )
    if name == "sync":
        return SyncLoss(
            target_coverage,
            alpha,
            lam,
            beta,
            prior,
            sync_term,
            divide_by_coverage=divide_by_coverage,
            distributed=distributed,
        )
    if name == "sat":
        if num_samples is None:
            raise ValueError("loss sat needs num_samples, the size of the training split")
        return SelfAdaptiveTrainingLoss(
            num_samples,
            momentum=sat_momentum,
            pretrain_epochs=sat_pretrain_epochs,
            entropy_weight=entropy_weight,
            distributed=distributed,
        )
    raise ValueError(f"loss should be one of {', '.join(LOSSES)}, but got {name!r}")
