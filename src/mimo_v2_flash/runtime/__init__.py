"""Running Megatron here: process groups, inference helpers and the scoped adaptations for hosts without CUDA."""
