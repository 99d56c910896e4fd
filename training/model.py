"""SelectiveNet: one body, three heads (Geifman & El-Yaniv, "SelectiveNet", ICML 2019).

    x [N, C, H, W] raw pixels in [0, 1]
      └─ normalise (buffers mean/std, so the exported graph takes raw pixels)
      └─ body  → features [N, D]
           ├─ f: prediction head  → logits     [N, K]
           ├─ g: selection head   → selection  [N]    (sigmoid, "answer this one")
           └─ h: auxiliary head   → aux_logits [N, K] (training only, not exported)

The heads follow SelectiveNet's, with these differences from its Keras reference
(github.com/geifmany/selectivenet, ``models/cifar10_vgg_selectivenet.py``):

* g is linear → ReLU → batch norm → linear → sigmoid; the reference divides the batch norm's
  output by 10 before the last linear layer ("identical to initialization of batchnorm gamma
  to 1/10", its comment). ``ModelConfig.selection_bn_gamma`` sets that γ's initial value:
  1.0 by default (ours), 0.1 for the reference's start (the quality sweep compares them).
  The fixed division itself is not in the graph, so γ trains at its own scale.
* ``vgg16_bn`` has dropout only after the dense layer; the reference also drops 0.3–0.4
  after most convolutions ("massive dropout"), which matters over 300 epochs more than
  over the short schedules run here; not added.
* f and h are plain linear layers (as the reference's softmax heads).

A :class:`ModelConfig` is saved inside every checkpoint, so a checkpoint rebuilds its model
without any other input (as nanoGPT's ``GPTConfig``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from abstain.training.defaults import BODIES  # the CLI reads the same tuple

#: What a model reports as ``selection`` (see :class:`ModelConfig`).
SELECTION_SOURCES = ("g", "softmax_response")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`SelectiveNet` (weights aside).

    Attributes:
        body: one of :data:`BODIES`.
        num_classes: K.
        in_channels, image_size: the input's C and H (= W).
        mean, std: per-channel normalisation baked into the model (buffers).
        selection_hidden: width of g's hidden layer (SelectiveNet uses 512).
        width: channel multiplier of ``small_cnn`` (ignored by the other bodies).
        dropout: dropout before the heads (VGG body and small CNN).
        selection_bn_gamma: initial γ of g's batch norm (SelectiveNet's reference: 0.1, see
            the module docstring).
        abstain_head: add Self-Adaptive Training's abstain logit (Huang et al., NeurIPS 2020):
            a linear layer beside f, so training sees K + 1 logits; never exported.
        selection_source: what the model reports as ``selection``: ``"g"`` (the selection head)
            or ``"softmax_response"`` (max softmax of f, for models trained without a g, ``ce``'s
            and SAT's: Feng et al., ICLR 2023, rank by it); ``selection_logit`` is then the softmax
            response's logit (:func:`softmax_response_logit`).
        detach_selection: g reads ``features.detach()``: the terms that involve g train only
            g's head, not the body (an ablation of SelectiveNet/SYNC; no effect at inference).
    """

    body: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))
    selection_hidden: int = 512
    width: int = 32
    dropout: float = 0.3
    selection_bn_gamma: float = 1.0
    abstain_head: bool = False
    selection_source: str = "g"
    detach_selection: bool = False

    def __post_init__(self) -> None:
        if self.selection_source not in SELECTION_SOURCES:
            raise ValueError(
                f"selection_source should be one of {', '.join(SELECTION_SOURCES)}, "
                f"but got {self.selection_source!r}"
            )
        if self.body not in BODIES:
            raise ValueError(f"body should be one of {', '.join(BODIES)}, but got {self.body!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes should be at least 2, but got {self.num_classes}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean/std should have in_channels={self.in_channels} values, "
                f"but got mean={self.mean} std={self.std}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["mean"] = tuple(float(v) for v in known.get("mean", (0.0,)))
        known["std"] = tuple(float(v) for v in known.get("std", (1.0,)))
        return cls(**known)


class SelectiveOutput(NamedTuple):
    """SelectiveNet's named outputs (a NamedTuple so tracing/ONNX export see plain tensors).

    :class:`SelectiveNet` returns every field in float32, also under autocast (its heads
    run in float32; see :meth:`SelectiveNet.forward_heads`).
    ``selection_logit`` is g before its sigmoid (``selection == sigmoid(selection_logit)``):
    losses take log g and log(1 − g) from it exactly, where ``selection`` saturates at 1 in
    float32 beyond a logit of ~17. It is optional (``None``) for outputs built by hand.
    """

    logits: torch.Tensor  # [N, K] prediction head f
    selection: torch.Tensor  # [N] selection head g, in [0, 1]
    aux_logits: torch.Tensor  # [N, K] auxiliary head h
    selection_logit: torch.Tensor | None = None  # [N] g before the sigmoid
    abstain_logit: torch.Tensor | None = None  # [N] SAT's extra (K+1-th) logit, training only


def softmax_response_logit(logits: torch.Tensor) -> torch.Tensor:
    """The logit of the softmax response: ``logits [N, K]`` → ``[N]``, with
    ``sigmoid(result) == max_k softmax(logits)_k``.

    ``s = e^{z_m} / (e^{z_m} + Σ_{k≠m} e^{z_k})`` for the arg-max m, so
    ``logit(s) = log(s / (1 − s)) = z_m − logsumexp_{k≠m} z_k``. Computed this way it does not
    saturate: in float32 ``s`` is exactly 1.0 once ``1 − s`` drops below 6e-8, and a coverage
    threshold could not split the most confident inputs (the reason graphs export g's logit
    too, docs/export.md). Only the arg-max column is masked, so a tie for the maximum gives
    ``logit ≤ −log 2``, as the softmax response (≤ 1/2) says. Needs K ≥ 2.
    """
    top = logits.max(dim=1)  # values [N], indices [N]
    columns = torch.arange(logits.shape[1], device=logits.device)
    is_top = columns[None, :] == top.indices[:, None]  # [N, K], one True per row
    others = torch.logsumexp(logits.masked_fill(is_top, float("-inf")), dim=1)  # [N]
    return top.values - others


def _small_cnn(in_channels: int, width: int, dropout: float) -> tuple[nn.Module, int]:
    """Two conv blocks (conv-BN-ReLU ×2, max-pool) then a 2×2 adaptive pool: 8×8 digits, 28×28 MNIST."""
    w = width

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers: list[nn.Module] = [
        *block(in_channels, w),
        *block(w, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),  # [N, 2w·4]
        nn.Linear(8 * w, 8 * w),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
    ]
    return nn.Sequential(*layers), 8 * w


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_bn(in_channels: int, dropout: float) -> tuple[nn.Module, int]:
    """VGG-16 with batch norm for 32×32 inputs, as in SelectiveNet's CIFAR experiments.

    Five pools take 32×32 to 1×1×512; a 512-wide dense layer with BN and dropout follows
    (SelectiveNet's Keras VGG). Any input size works thanks to a final adaptive pool.
    """
    layers: list[nn.Module] = []
    cin = in_channels
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [
                nn.Conv2d(cin, int(v), 3, padding=1, bias=False),
                nn.BatchNorm2d(int(v)),
                nn.ReLU(inplace=True),
            ]
            cin = int(v)
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(512),
        nn.Dropout(dropout),
    ]
    return nn.Sequential(*layers), 512


def _resnet(name: str, in_channels: int) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18/34 with the classifier removed (features [N, 512]); random init."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_body(config: ModelConfig) -> tuple[nn.Module, int]:
    """The body for ``config.body`` and its feature width D."""
    if config.body == "small_cnn":
        return _small_cnn(config.in_channels, config.width, config.dropout)
    if config.body == "vgg16_bn":
        return _vgg16_bn(config.in_channels, config.dropout)
    return _resnet(config.body, config.in_channels)


class SelectiveNet(nn.Module):
    """Body + heads f, g, h. ``forward(x)`` returns a :class:`SelectiveOutput`."""

    mean: torch.Tensor  # buffers, registered in __init__: [1, C, 1, 1]
    std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, c, 1, 1))
        self.body, dim = build_body(config)
        k, hidden = config.num_classes, config.selection_hidden
        self.predictor = nn.Linear(dim, k)  # f
        selector_bn = nn.BatchNorm1d(hidden)  # its init draws no random numbers: the Linears' are unchanged
        self.selector = nn.Sequential(  # g: SelectiveNet's head
            nn.Linear(dim, hidden),
            nn.ReLU(inplace=True),
            selector_bn,
            nn.Linear(hidden, 1),
        )
        self.auxiliary = nn.Linear(dim, k)  # h
        # SAT's abstain logit: a (K+1)-th output of the classifier layer, kept apart from f so that
        # f and the exported graph are the same with or without it (Huang et al. 2020)
        self.abstain = nn.Linear(dim, 1) if config.abstain_head else None
        nn.init.constant_(selector_bn.weight, config.selection_bn_gamma)  # g's BN γ

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels ``[N, C, H, W]`` in [0, 1] → features ``[N, D]``."""
        return self.body((x - self.mean) / self.std)

    def forward_heads(self, features: torch.Tensor) -> SelectiveOutput:
        """Features ``[N, D]`` → ``SelectiveOutput(logits [N, K], selection [N], aux_logits [N, K],
        selection_logit [N])``, float32 also under autocast.

        Under autocast the body runs in bf16 but the heads run in float32, autocast off: in
        bf16, g's logit near 7 steps by 0.03 and sigmoid(7) rounds to 1.0 (steps of 0.004 near
        1), so g could not rank confident samples and its gradient would vanish. The heads are
        a few small matmuls (D × 512 at most) against the body's millions, so float32 costs
        nothing measurable. Without autocast (evaluation, export) this branch is not taken, so
        the exported graph is the same as before.
        """
        device_type = features.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                return self._heads(features.float())
        return self._heads(features)

    def _heads(self, features: torch.Tensor) -> SelectiveOutput:
        logits = self.predictor(features)  # [N, K]
        if self.config.selection_source == "softmax_response":
            selection_logit = softmax_response_logit(logits)  # [N]; g is not used
        else:
            g_input = features.detach() if self.config.detach_selection else features
            selection_logit = self.selector(g_input).squeeze(-1)  # [N, 1] → [N], never [N, 1]
        abstain_logit = self.abstain(features).squeeze(-1) if self.abstain is not None else None
        return SelectiveOutput(
            logits,
            torch.sigmoid(selection_logit),
            self.auxiliary(features),
            selection_logit,
            abstain_logit,
        )

    def forward(self, x: torch.Tensor) -> SelectiveOutput:
        return self.forward_heads(self.forward_features(x))


def load_body_weights(model: SelectiveNet, path: Path) -> None:
    """Load local pretrained weights (a torchvision-style state dict) into the body, never a download.

    Keys of the classifier (``fc.*``) and mismatched shapes are skipped; a file that matches
    no key at all is an error, since it is almost certainly the wrong file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.body.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(
            f"{path}: none of its {len(state)} tensors match the {model.config.body} body "
            f"(expected keys such as {next(iter(own))!r})"
        )
    model.body.load_state_dict(usable, strict=False)
