"""Triton integration: the remote backends, the health monitor, the ensemble and its decision counter."""
