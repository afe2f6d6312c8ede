"""Fake ``neuronx_distributed_inference.utils``."""
