"""Import overlay: make this repository's MiMo-V2-Flash bridge the one Megatron-Bridge loads.

megatron-bridge 0.6.2 ships its own ``megatron.bridge.models.mimo_v2_flash`` (TE-only, known numerical
gaps) and ``megatron/bridge/models/__init__.py`` imports it, which registers that bridge for
``MiMoV2FlashForCausalLM``. Copying files over the installed wheel would leave a mix of both versions
behind and break on reinstall, so instead a meta-path finder, installed at interpreter start-up by
``zz_mimo_v2_flash_overlay.pth`` (shipped in this project's wheel), answers two module names:

* ``megatron.bridge.models.mimo_v2_flash`` and its submodules resolve to
  ``src/megatron/bridge/models/mimo_v2_flash`` of this repository. Everything that imports the upstream
  name (including ``megatron.bridge.models``' own import, hence the bridge registry and ``AutoBridge``)
  gets our code; upstream's files are never executed.
* ``megatron.bridge.peft.lora_layers`` imports ``transformer_engine.pytorch`` unconditionally, so
  ``import megatron.bridge`` fails without TransformerEngine. When TE is not importable, that one module
  is executed with an ``__import__`` that hands it an inert stand-in for ``transformer_engine``; nothing
  is put in ``sys.modules``, so Megatron-Core and every other module still see TE as absent
  (``HAVE_TE = False``). With TE installed the module is loaded untouched.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

OVERLAID_PACKAGE = "megatron.bridge.models.mimo_v2_flash"
TE_IMPORTING_MODULE = "megatron.bridge.peft.lora_layers"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "megatron" / "bridge" / "models" / "mimo_v2_flash"


def transformer_engine_available() -> bool:
    """Whether a real TransformerEngine can be found (without importing it)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def _inert_transformer_engine() -> types.ModuleType:
    """A stand-in for ``transformer_engine`` that only satisfies ``lora_layers``' module-level names.

    ``lora_layers`` only touches TE inside code paths guarded by ``isinstance(x, (te.Linear,
    te.LayerNormLinear))``; with classes that nothing is an instance of, those paths are never taken.
    """

    class _Absent:
        """Placeholder TE class: no object is an instance of it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("transformer_engine is not installed; this TE feature is unavailable")

    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.Linear = type("Linear", (_Absent,), {})
    pytorch.LayerNormLinear = type("LayerNormLinear", (_Absent,), {})
    pytorch.ops = types.SimpleNamespace(Sequential=type("Sequential", (_Absent,), {}))
    pytorch.fp8_autocast = _Absent
    te = types.ModuleType("transformer_engine")
    te.pytorch = pytorch
    te.__mimo_v2_flash_stand_in__ = pytorch.__mimo_v2_flash_stand_in__ = True
    return te


class _WithoutTELoader(importlib.abc.Loader):
    """Runs a module whose ``import transformer_engine...`` statements receive the inert stand-in."""

    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        stand_in = _inert_transformer_engine()
        real_import = builtins.__import__

        def confined_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and (name == "transformer_engine" or name.startswith("transformer_engine.")):
                return stand_in if not fromlist or name == "transformer_engine" else stand_in.pytorch
            return real_import(name, globals, locals, fromlist, level)

        module_builtins = dict(vars(builtins))
        module_builtins["__import__"] = confined_import
        module.__builtins__ = module_builtins
        code = self._wrapped.get_code(module.__name__)
        exec(code, module.__dict__)


class MiMoV2FlashOverlayFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder implementing the two redirections described in the module docstring."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == OVERLAID_PACKAGE or fullname.startswith(OVERLAID_PACKAGE + "."):
            return self._overlay_spec(fullname)
        if fullname == TE_IMPORTING_MODULE and not transformer_engine_available():
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                spec.loader = _WithoutTELoader(spec.loader)
            return spec
        return None

    @staticmethod
    def _overlay_spec(fullname: str) -> importlib.machinery.ModuleSpec | None:
        relative = fullname[len(OVERLAID_PACKAGE) :].lstrip(".").split(".") if fullname != OVERLAID_PACKAGE else []
        target = PACKAGE_DIR.joinpath(*relative)
        if target.is_dir():
            return importlib.util.spec_from_file_location(
                fullname, target / "__init__.py", submodule_search_locations=[str(target)]
            )
        source = target.with_suffix(".py")
        if source.is_file():
            return importlib.util.spec_from_file_location(fullname, source)
        return None


def install() -> None:
    """Put the overlay finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(finder, MiMoV2FlashOverlayFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MiMoV2FlashOverlayFinder())


def quiet_framework_logs() -> None:
    """Silence import-time noise from Megatron-Core / Megatron-Bridge (missing Apex/TE notices) in CLIs.

    Call before the first ``megatron`` import; genuine errors still surface as exceptions.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|modelopt)(\..*)?")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in (
        "megatron.bridge.utils.import_utils",
        "megatron.core",
        "megatron.bridge",
        "torch.utils.cpp_extension",
    ):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # import_utils resets its own level to INFO when imported; a filter survives that.
        logger.addFilter(lambda record: record.levelno >= logging.ERROR)
