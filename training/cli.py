"""PLACEHOLDER — replaced by the training work (issue 2)."""


def train() -> None:
    """Train a SelectiveNet (not yet implemented)."""
    raise NotImplementedError
