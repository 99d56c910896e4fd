"""PLACEHOLDER — replaced by the serving work (issue 5)."""


def serve() -> None:
    """Serve a model (not yet implemented)."""
    raise NotImplementedError
