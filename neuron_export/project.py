"""Fast access to the project's MiMo-V2-Flash checkpoint modules (without importing all of Megatron-Bridge).

``import megatron.bridge.models.mimo_v2_flash.hf_checkpoint`` first runs ``megatron/bridge/__init__.py``, which
imports the whole framework (Megatron-Core, training, diffusion models: ~8-14 s). The modules ``neuron_export``
needs are leaves that import only torch, safetensors and each other, so when Megatron-Bridge is not loaded yet
they are executed here directly from their overlay location (``mimo_v2_flash_overlay.PACKAGE_DIR``) and
registered under their real module names. Later imports of those names (from anywhere) get the same module
objects, so classes such as ``CheckpointError`` keep one identity. If Megatron-Bridge is already imported, the
ordinary import is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

PACKAGE = "megatron.bridge.models.mimo_v2_flash"
# Leaf modules in dependency order: each imports only torch/safetensors/stdlib and the modules before it.
LIGHT_MODULES = (
    "mimo_v2_flash_config",
    "hf_checkpoint",
    "output_dirs",
    "reused_memory",
    "fp8_scale_layouts",
    "fp8_quantization",
    "mimo_v2_flash_fp8",
    "checkpoint_validation",
    "hf_export",
    "tiny_checkpoint",
)


def _quiet() -> None:
    from mimo_v2_flash_overlay import quiet_framework_logs

    quiet_framework_logs()


def _load_leaf(leaf: str) -> ModuleType:
    import mimo_v2_flash_overlay

    name = f"{PACKAGE}.{leaf}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, mimo_v2_flash_overlay.PACKAGE_DIR / f"{leaf}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def module(leaf: str) -> ModuleType:
    """The project module ``megatron.bridge.models.mimo_v2_flash.<leaf>`` (fast path when possible)."""
    _quiet()
    if leaf not in LIGHT_MODULES or "megatron.bridge" in sys.modules:
        return importlib.import_module(f"{PACKAGE}.{leaf}")
    for dependency in LIGHT_MODULES[: LIGHT_MODULES.index(leaf) + 1]:
        _load_leaf(dependency)
    return sys.modules[f"{PACKAGE}.{leaf}"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are expected, user-facing problems (reported as one line, exit code 2)."""
    from neuron_export.errors import ExportError

    return (
        ExportError,
        module("hf_checkpoint").CheckpointError,
        module("mimo_v2_flash_config").MiMoV2FlashConfigError,
    )
