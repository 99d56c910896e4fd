"""PLACEHOLDER — replaced by the export work (issue 3)."""


def export(checkpoint: str) -> None:
    """Export a checkpoint to ONNX (not yet implemented)."""
    raise NotImplementedError
