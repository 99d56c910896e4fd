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
    DEFAULT_LAMBDA,
    DEFAULT_PRIOR,
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
        distributed: under DDP, compute φ̂ and r̂ from the sums over all processes (see the
            module docstring); every process must then call the loss on every step.
    """

    def __init__(
        self,
        target_coverage: float = DEFAULT_TARGET_COVERAGE,
        alpha: float = DEFAULT_ALPHA,
        lam: float = DEFAULT_LAMBDA,
        *,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        _check_probability("target_coverage", target_coverage, low_open=True)
        _check_probability("alpha", alpha)
        if lam < 0:
            raise ValueError(f"lam (λ) should be >= 0, but got {lam}")
        self.target_coverage, self.alpha, self.lam = float(target_coverage), float(alpha), float(lam)
        self.distributed = bool(distributed)

    def forward(self, output: SelectiveOutput, target: torch.Tensor) -> LossOutput:
        _check_batch(output, target)
        ce_f = F.cross_entropy(output.logits.float(), target, reduction="none")  # [B]
        g = output.selection.float()  # [B]
        # [B]·[B]: shapes checked above, no broadcasting. Sums over the global batch under DDP.
        sums = _global_sum(torch.stack([g.sum(), (ce_f * g).sum()]), self.distributed)  # [2]
        n = target.shape[0] * (dist.get_world_size() if self.distributed else 1)
        coverage = sums[0] / n
        risk = sums[1] / sums[0]
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
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta (β) should be >= 0, but got {beta}")
        if prior not in PRIOR_HEADS:
            raise ValueError(f"prior should be one of {', '.join(PRIOR_HEADS)}, but got {prior!r}")
        if term not in SYNC_TERMS:
            raise ValueError(f"term should be one of {', '.join(SYNC_TERMS)}, but got {term!r}")
        self.selectivenet = SelectiveNetLoss(target_coverage, alpha, lam, distributed=distributed)
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
    distributed: bool = False,
) -> nn.Module:
    """The loss called ``name`` (one of :data:`LOSSES`) with its hyper-parameters.

    ``distributed``: the loss runs under DDP with a process group (see the module docstring).
    """
    if name == "ce":
        return CrossEntropyLoss()
    if name == "selectivenet":
        return SelectiveNetLoss(target_coverage, alpha, lam, distributed=distributed)
    if name == "sync":
        return SyncLoss(target_coverage, alpha, lam, beta, prior, sync_term, distributed=distributed)
    raise ValueError(f"loss should be one of {', '.join(LOSSES)}, but got {name!r}")
