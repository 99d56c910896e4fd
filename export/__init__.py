"""abstain.export: checkpoint → ONNX, parity check, model-repository entry.

Installed as ``abstain.export`` (``export/`` in the source tree).
"""
