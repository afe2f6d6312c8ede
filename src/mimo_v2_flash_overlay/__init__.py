"""Import overlay: make this repository's MiMo-V2-Flash bridge the one Megatron-Bridge loads.

megatron-bridge 0.6.2 ships its own ``megatron.bridge.models.mimo_v2_flash`` (TE-only, known numerical
gaps) and ``megatron/bridge/models/__init__.py`` imports it, which registers that bridge for
``MiMoV2FlashForCausalLM``. Copying files over the installed wheel would leave a mix of both versions
behind and break on reinstall, so instead a meta-path finder, installed at interpreter start-up by
``zz_mimo_v2_flash_overlay.pth`` (shipped in this project's wheel), answers these module names:

* ``megatron.bridge.models.mimo_v2_flash`` and its submodules resolve to this project's model package:
  ``src/megatron/bridge/models/mimo_v2_flash`` of a source tree (editable install), or the copy the wheel ships
  as ``mimo_v2_flash_overlay/model_package`` (the wheel ships nothing under ``megatron/``, so installing,
  reinstalling or uninstalling either distribution never touches the other's files). Everything that imports
  the upstream name (including ``megatron.bridge.models``' own import, hence the bridge registry and
  ``AutoBridge``) gets our code; upstream's files are never executed. ``MIMO_V2_FLASH_OVERLAY=0`` turns this
  redirection off (upstream's package loads, to compare with it); the stand-ins below stay.
* ``megatron.bridge.peft.lora_layers`` imports ``transformer_engine.pytorch`` unconditionally, so
  ``import megatron.bridge`` fails without TransformerEngine. When TE is not importable, that one module
  is executed with an ``__import__`` that hands it an inert stand-in for ``transformer_engine``; nothing
  is put in ``sys.modules``, so Megatron-Core and every other module still see TE as absent
  (``HAVE_TE = False``). With TE installed the module is loaded untouched.
* ``megatron.bridge.training.pretrain`` imports ``nvidia_resiliency_ext`` for a type annotation; without it,
  the same confined mechanism (``CONFINED_STAND_INS``) makes ``megatron.bridge.training`` importable.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

OVERLAID_PACKAGE = "megatron.bridge.models.mimo_v2_flash"
SWITCH = "MIMO_V2_FLASH_OVERLAY"
"""Set to ``0`` to load upstream's ``megatron.bridge.models.mimo_v2_flash`` (to compare with it)."""


def _package_dir() -> Path:
    """The model package's files: shipped inside this package by the wheel, or the source tree's."""
    here = Path(__file__).resolve().parent
    shipped = here / "model_package"
    return shipped if shipped.is_dir() else here.parent / "megatron" / "bridge" / "models" / "mimo_v2_flash"


PACKAGE_DIR = _package_dir()


def package_available(name: str) -> bool:
    """Whether a real top-level package can be found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def transformer_engine_available() -> bool:
    """Whether a real TransformerEngine can be found (without importing it)."""
    return package_available("transformer_engine")


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


def _inert_resiliency_ext() -> types.ModuleType:
    """A stand-in for ``nvidia_resiliency_ext``: ``training/pretrain.py`` only uses ``inprocess.CallWrapper`` as a
    type annotation (the in-process restart wrapper, which is only injected when nvidia-resiliency-ext runs it)."""

    class CallWrapper:
        """Placeholder type: never instantiated without nvidia-resiliency-ext."""

    inprocess = types.ModuleType("nvidia_resiliency_ext.inprocess")
    inprocess.CallWrapper = CallWrapper
    package = types.ModuleType("nvidia_resiliency_ext")
    package.inprocess = inprocess
    package.__mimo_v2_flash_stand_in__ = inprocess.__mimo_v2_flash_stand_in__ = True
    return package


# module importing an optional package unconditionally -> (that package, factory of its inert stand-in)
CONFINED_STAND_INS = {
    # ``import transformer_engine.pytorch as te`` at module level; TE is only used behind isinstance checks.
    "megatron.bridge.peft.lora_layers": ("transformer_engine", _inert_transformer_engine),
    # ``from nvidia_resiliency_ext.inprocess import CallWrapper`` for a type annotation; the only installable
    # release (0.4.1) crashes Megatron-Core at import, and newer ones need glibc 2.39.
    "megatron.bridge.training.pretrain": ("nvidia_resiliency_ext", _inert_resiliency_ext),
}


class _ConfinedStandInLoader(importlib.abc.Loader):
    """Runs a module whose imports of one absent package receive an inert stand-in (nothing in sys.modules)."""

    def __init__(self, wrapped: importlib.abc.Loader, package: str, factory) -> None:
        self._wrapped = wrapped
        self._package = package
        self._factory = factory

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        stand_in = self._factory()
        package = self._package
        real_import = builtins.__import__

        def confined_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and (name == package or name.startswith(package + ".")):
                if not fromlist:
                    return stand_in
                target = stand_in
                for part in name.split(".")[1:]:
                    target = getattr(target, part)
                return target
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
            return None if os.environ.get(SWITCH) == "0" else self._overlay_spec(fullname)
        if fullname in CONFINED_STAND_INS:
            package, factory = CONFINED_STAND_INS[fullname]
            if package_available(package):
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                spec.loader = _ConfinedStandInLoader(spec.loader, package, factory)
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
