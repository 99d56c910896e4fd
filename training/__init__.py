"""abstain.training: SelectiveNet, the SYNC / SelectiveNet / CE losses, data and the loop.

Installed as ``abstain.training`` (``training/`` in the source tree).
"""
