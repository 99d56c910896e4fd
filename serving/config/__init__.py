"""Service configuration: the ``ABSTAIN_*`` options, their settings object, usable CPUs."""
