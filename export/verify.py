"""Parity check: ONNX Runtime on the exported graph against PyTorch on the checkpoint's model.

An export only succeeds if, on the same inputs, both outputs agree elementwise within

    |onnx - torch| <= atol + rtol * |torch|

at batch size 64 (one batch) and at batch size 1 (the first images, one at a time), since a
graph can be right for one batch size and wrong for another (a batch dimension baked in, or
batch-norm statistics mixed up with the batch). fp32 uses 1e-4 absolute (the issue's
tolerance); fp16 graphs are compared with the same float32 PyTorch model, so the tolerance
covers float16 rounding (10-bit mantissa, ~1e-3 relative per operation, accumulated over depth).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from abstain.contract import INPUT_NAME, LOGITS_NAME, SELECTION_LOGIT_NAME, SELECTION_NAME, InputSpec

#: Batch sizes the graph is checked at (the issue: 1 and 64).
BATCH_SIZES = (1, 64)
#: How many images are also run one at a time (batch size 1).
SINGLE_IMAGES = 4


@dataclass(frozen=True)
class Tolerance:
    """Elementwise ``|a - b| <= atol + rtol * |b|`` with ``b`` the PyTorch float32 reference."""

    atol: float
    rtol: float = 0.0

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"tolerance should be non-negative, but got atol={self.atol} rtol={self.rtol}")


FP32_TOLERANCE = Tolerance(atol=1e-4)
#: float16: selection in [0, 1] within 1e-2, logits within 1e-2 + 1 % of their magnitude.
FP16_TOLERANCE = Tolerance(atol=1e-2, rtol=1e-2)


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance (message has the numbers)."""


@dataclass(frozen=True)
class ParityReport:
    """Worst absolute differences per output over every checked batch, and what was checked."""

    max_abs_logits: float
    max_abs_selection: float
    max_abs_selection_logit: float
    batch_sizes: tuple[int, ...]
    num_images: int
    inputs: str  # where the images came from, e.g. "digits/test" or "synthetic"
    tolerance: Tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verification_inputs(
    spec: InputSpec, dataset: str | None, n: int = 64, seed: int = 0
) -> tuple[np.ndarray, str]:
    """``n`` float32 images ``[n, C, H, W]`` in [0, 1] to check the graph on, and their source.

    Real images when ``dataset`` (the checkpoint's training dataset) is an array dataset of
    the right shape, whose ``test`` split loads from local files (never a download): the
    graph must agree with PyTorch on the data it will serve, where activations look like in
    training. The last two images are all-black and all-white (the input range's extremes).
    Otherwise (unknown dataset, missing files, other shape) seeded uniform noise.
    """
    rng = np.random.default_rng(seed)
    x: np.ndarray | None = None
    source = "synthetic uniform noise"
    if dataset:
        from abstain.datasets import ARRAY_DATASETS, load_array_dataset

        if dataset in ARRAY_DATASETS:
            try:
                split = load_array_dataset(dataset, "test")
            except (FileNotFoundError, ValueError):
                split = None  # e.g. Fashion-MNIST files absent on this machine
            if split is not None and tuple(split.x.shape[1:]) == spec.shape:
                pick = rng.choice(len(split), size=min(n - 2, len(split)), replace=False)
                x, source = split.x[np.sort(pick)], f"{dataset}/test"
    if x is None:
        x = rng.random((n - 2, *spec.shape), dtype=np.float32)
    extremes = np.stack([np.zeros(spec.shape, np.float32), np.ones(spec.shape, np.float32)])
    return np.ascontiguousarray(np.concatenate([x, extremes]), dtype=np.float32), source


#: The outputs compared, in the graph's order.
_OUTPUTS = (LOGITS_NAME, SELECTION_NAME, SELECTION_LOGIT_NAME)


def _torch_outputs(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.inference_mode():
        out = model(torch.from_numpy(x))
    return out.logits.float().numpy(), out.selection.float().numpy(), out.selection_logit.float().numpy()


def verify_parity(
    model: nn.Module,
    model_bytes: bytes,
    x: np.ndarray,
    source: str = "given",
    tolerance: Tolerance = FP32_TOLERANCE,
) -> ParityReport:
    """Run ``x`` (``[n, C, H, W]``, n ≤ 64) through PyTorch and ONNX Runtime (CPU) and compare.

    ``x`` is run as one batch and its first :data:`SINGLE_IMAGES` images one by one.

    Raises:
        ParityError: a value differs beyond ``tolerance``, or an output has the wrong shape;
            the message gives the max absolute difference of each output at each batch size.
    """
    import onnxruntime as ort

    model = model.eval()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    batches = [x] + [x[i : i + 1] for i in range(min(SINGLE_IMAGES, len(x)))]
    worst = dict.fromkeys(_OUTPUTS, 0.0)
    failures: list[str] = []
    for batch in batches:
        ref = dict(zip(_OUTPUTS, _torch_outputs(model, batch), strict=True))
        got = dict(zip(_OUTPUTS, session.run(list(_OUTPUTS), {INPUT_NAME: batch}), strict=True))
        for name in _OUTPUTS:
            if got[name].shape != ref[name].shape:
                raise ParityError(
                    f"ONNX output {name!r} has shape {list(got[name].shape)} at batch size {len(batch)}, "
                    f"but PyTorch gives {list(ref[name].shape)}"
                )
            diff = np.abs(got[name].astype(np.float64) - ref[name].astype(np.float64))
            worst[name] = max(worst[name], float(diff.max()))
            allowed = tolerance.atol + tolerance.rtol * np.abs(ref[name].astype(np.float64))
            if not np.all(diff <= allowed) or not np.all(np.isfinite(got[name])):
                failures.append(f"{name} at batch size {len(batch)}: max abs diff {float(diff.max()):.3g}")
    if failures:
        raise ParityError(
            "ONNX Runtime and PyTorch disagree beyond the tolerance "
            f"(atol={tolerance.atol:g}, rtol={tolerance.rtol:g}) on {len(x)} images ({source}): "
            + "; ".join(failures)
        )
    sizes = tuple(sorted({len(b) for b in batches}))
    return ParityReport(
        worst[LOGITS_NAME],
        worst[SELECTION_NAME],
        worst[SELECTION_LOGIT_NAME],
        sizes,
        len(x),
        source,
        tolerance,
    )
