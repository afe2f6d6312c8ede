"""MiMo-V2-Flash modeling on Megatron-Core: attention (asymmetric heads, sinks, value scale, dual-base RoPE) and
the layer specs that place it in hybrid full / sliding-window blocks."""
