"""abstain: selective inference — classifiers that predict or abstain.

The core package holds what every stage shares: the artifact contract
(:mod:`abstain.contract`), atomic file writing (:mod:`abstain.io`), the array-level
datasets (:mod:`abstain.datasets`) and the selective-prediction maths in numpy
(:mod:`abstain.risk_coverage`). It imports neither torch nor any serving library.
"""

from abstain.version import code_version

__version__ = "0.1.0"
__all__ = ["__version__", "code_version"]
