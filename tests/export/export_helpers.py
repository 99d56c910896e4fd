"""Helpers for the export tests: random-weight checkpoints in the real format, repository snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from abstain.contract import InputSpec
from abstain.training.checkpoint import CHECKPOINT_FORMAT
from abstain.training.model import ModelConfig, SelectiveNet


def checkpoint_dict(
    body: str = "small_cnn",
    image_size: int = 8,
    in_channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
    dataset: str = "digits",
    **config: object,
) -> dict:
    """An abstain checkpoint of a random-weight SelectiveNet (batch-norm statistics perturbed,
    so that eval-mode normalisation is not the identity and a wrong export would show)."""
    torch.manual_seed(seed)
    mean, std = (0.5,) * in_channels, (0.25,) * in_channels
    model_config = ModelConfig(
        body=body,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        **config,
    )
    model = SelectiveNet(model_config)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config.to_dict(),
        "state_dict": model.state_dict(),
        "class_names": [f"class_{i}" for i in range(num_classes)]
        if dataset != "digits"
        else [str(i) for i in range(num_classes)],
        "input_spec": InputSpec(in_channels, image_size, image_size, mean, std).to_dict(),
        "train_config": {"loss": "sync", "beta": 1.0, "target_coverage": 0.8, "dataset": dataset},
        "data_fingerprint": "f" * 64,
        "metrics": {"split": "test", "accuracy": 0.97},
        "code_version": "0.1.0+gtest",
        "epoch": 3,
    }


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) → sha256 of a file, or "dir"."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }
