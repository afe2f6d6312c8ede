"""MiMo-V2-Flash tooling around Megatron-Bridge: checkpoint I/O, conversion, training, runtime and planning.

Importing any module of this package needs only torch and safetensors (plus the standard library): Megatron-Core
and Megatron-Bridge are imported inside the functions that build or run a model. The model itself (bridge,
provider, mappings, modeling, step, recipe) is ``megatron.bridge.models.mimo_v2_flash``. Floors, top-down:
``conversion`` / ``training`` -> the model package -> ``checkpoint`` -> ``config``; ``runtime`` and ``planning``
serve the floors above them.
"""
