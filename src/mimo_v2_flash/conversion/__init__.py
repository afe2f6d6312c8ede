"""HF <-> Megatron conversion: streaming import, HF export, LoRA adapter export, Megatron checkpoint access."""
