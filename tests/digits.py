"""scikit-learn's digits for tests that must run without scikit-learn (the serve-only CI run).

``tests/data/digits.npz`` holds ``sklearn.datasets.load_digits()``'s images (pixel values
0–16, uint8) and targets, as scikit-learn ships them (BSD-3-Clause; the UCI "Optical
Recognition of Handwritten Digits" data). :func:`load_digits` splits them exactly as
:func:`abstain.datasets.load_digits` does; ``tests/abstain/test_digits_copy.py`` checks the two
are identical wherever scikit-learn is installed, so the copy cannot drift.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from abstain.datasets import DIGITS_CLASS_NAMES, ArraySplit, _check_split, stratified_split_indices

COPY = Path(__file__).resolve().parent / "data" / "digits.npz"


@functools.cache
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    with np.load(COPY) as data:
        x = (data["images"].astype(np.float32) / 16.0)[:, None, :, :]
        y = data["target"].astype(np.int64)
    return x, y


def load_digits(split: str) -> ArraySplit:
    """The digits ``split`` as ``[N, 1, 8, 8]`` in [0, 1], identical to ``abstain.datasets.load_digits``."""
    _check_split(split)
    x, y = _arrays()
    train, val, test = stratified_split_indices(y, (0.6, 0.2, 0.2))
    idx = {"train": train, "val": val, "test": test}[split]
    return ArraySplit(x=x[idx], y=y[idx], class_names=DIGITS_CLASS_NAMES, name=f"digits/{split}")
