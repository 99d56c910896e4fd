"""abstain.calibration: offline work on an exported graph — calibrate, evaluate, labelled data sources.

Installed as ``abstain.calibration`` (``calibration/`` in the source tree). Never imports torch
or BentoML.
"""
