"""abstain.serving: the BentoML service, inference backends, decisions and metrics.

Installed as ``abstain.serving`` (``serving/`` in the source tree). Never imports torch,
scikit-learn or matplotlib; importing the package itself imports nothing heavy.
"""
