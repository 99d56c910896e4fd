"""The tests' copy of the digits (``tests/digits.py``) is scikit-learn's, split the same way."""

from __future__ import annotations

import numpy as np
import pytest

from abstain.datasets import load_digits
from tests.digits import load_digits as load_digits_copy

pytest.importorskip("sklearn", reason="the copy is compared with scikit-learn's digits")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_copy_equals_scikit_learn_digits(split: str) -> None:
    ours, theirs = load_digits_copy(split), load_digits(split)
    assert ours.x.dtype == theirs.x.dtype and ours.y.dtype == theirs.y.dtype
    np.testing.assert_array_equal(ours.x, theirs.x)
    np.testing.assert_array_equal(ours.y, theirs.y)
    assert ours.fingerprint == theirs.fingerprint
    assert ours.class_names == theirs.class_names and ours.name == theirs.name
