"""Inference: verified artifacts, backends that run the graph, the adaptive batcher."""
