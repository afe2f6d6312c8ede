"""HF checkpoint I/O with torch and safetensors only: reading, FP8 dequantization, validation and writing."""
