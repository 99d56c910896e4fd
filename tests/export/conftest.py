"""Fixtures for the export tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from abstain.training.checkpoint import save_checkpoint
from tests.export.export_helpers import checkpoint_dict


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """``make_checkpoint(filename="checkpoint.pt", **checkpoint_dict kwargs) -> path``."""

    def make(filename: str = "checkpoint.pt", **kwargs: object) -> Path:
        path = tmp_path / filename
        save_checkpoint(path, checkpoint_dict(**kwargs))  # type: ignore[arg-type]
        return path

    return make
