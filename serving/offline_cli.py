"""PLACEHOLDER — replaced by the calibration work (issue 4)."""


def calibrate(model_dir: str) -> None:
    """Calibrate thresholds (not yet implemented)."""
    raise NotImplementedError


def evaluate(model_dir: str) -> None:
    """Evaluate operating points (not yet implemented)."""
    raise NotImplementedError
