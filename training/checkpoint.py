"""Checkpoints: one dict that rebuilds its own model, written atomically, loaded with weights_only.

A checkpoint holds (all plain Python containers and tensors, so ``torch.load(weights_only=True)``
reads it)::

    format            "abstain.checkpoint/1"
    model_config      ModelConfig.to_dict()
    state_dict        the SelectiveNet weights (always on CPU)
    class_names       list[str], K entries
    input_spec        abstain.contract.InputSpec.to_dict()
    train_config      dict: loss, beta, target coverage, dataset, epochs, lr, seed, ...
    data_fingerprint  fingerprint of the training split (abstain.datasets.fingerprint)
    metrics           dict: the last evaluation (val during training; test at the end)
    code_version      abstain.code_version()
    epoch             epochs completed
    optimizer, scheduler, scaler, rng   (optional) state for resuming
    loss_state        (``sat`` only) the per-sample EMA targets: ``targets`` [N], ``seen`` [N]
    swa               (``--swa-epochs`` only) ``epochs``, ``averaged`` (snapshots so far),
                      ``finalized`` (``state_dict`` is the average, BN re-estimated) and the
                      running average's ``state_dict`` until then

Export, calibration and serving need nothing but this file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from abstain.contract import InputSpec
from abstain.io import atomic_write_bytes
from abstain.training.model import ModelConfig, SelectiveNet

CHECKPOINT_FORMAT = "abstain.checkpoint/1"
REQUIRED_KEYS = ("format", "model_config", "state_dict", "class_names", "input_spec", "train_config")


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (serialise to memory, temp file, rename)."""
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint is missing keys {missing}; required: {list(REQUIRED_KEYS)}")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and validate a checkpoint (``weights_only=True``, tensors on CPU).

    Raises ``FileNotFoundError`` if absent, ``ValueError`` naming the problem if the file is
    corrupted, not a torch file, or not an abstain checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, weights_only refusals...
        raise ValueError(
            f"{path} is not a readable abstain checkpoint ({type(exc).__name__}: {exc}); "
            "expected a file written by `abstain train`"
        ) from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an abstain checkpoint: expected format {CHECKPOINT_FORMAT!r}, "
            f"but found {found!r} (a plain state_dict or another project's checkpoint?)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing keys {missing}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> SelectiveNet:
    """Rebuild the :class:`SelectiveNet` of a loaded checkpoint, weights loaded, in eval mode."""
    config = ModelConfig.from_dict(checkpoint["model_config"])
    model = SelectiveNet(config)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not fit its model config {config}: {exc}") from exc
    return model.eval()


def input_spec_from_checkpoint(checkpoint: dict[str, Any]) -> InputSpec:
    return InputSpec.from_dict(checkpoint["input_spec"])
