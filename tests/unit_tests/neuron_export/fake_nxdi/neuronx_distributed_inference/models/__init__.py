"""Fake ``neuronx_distributed_inference.models``."""
