"""The package boundaries: a light project package, a model package that needs no conversion or training code,
no import cycles between modules, and no module executed from a file path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PROJECT = REPO / "src/mimo_v2_flash"
MODEL = REPO / "src/megatron/bridge/models/mimo_v2_flash"
# The project's floors, top-down: a module may import its own floor and the floors below it.
FLOORS = [
    (
        "mimo_v2_flash.conversion",
        "mimo_v2_flash.training",
        "mimo_v2_flash.runtime",
        "mimo_v2_flash.planning.cli",
        "mimo_v2_flash.make_tiny_checkpoint",
    ),
    ("megatron.bridge.models.mimo_v2_flash",),
    ("megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash",),
    ("mimo_v2_flash.checkpoint", "mimo_v2_flash.tiny_checkpoint", "mimo_v2_flash.tiny_family_checkpoint"),
    ("mimo_v2_flash.config", "mimo_v2_flash.planning"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    files = [*PROJECT.rglob("*.py"), *MODEL.rglob("*.py")]
    modules = {_module_name(path): path for path in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _floor(module: str) -> int:
    matches = [(len(prefix), i) for i, floor in enumerate(FLOORS) for prefix in floor if module.startswith(prefix)]
    return max(matches)[1]


def test_project_modules_import_no_megatron():
    code = (
        "import importlib, pkgutil, sys, mimo_v2_flash\n"
        "for m in pkgutil.walk_packages(mimo_v2_flash.__path__, 'mimo_v2_flash.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_each_module_imports_only_its_floor_and_below():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _floor(target) < _floor(module) and not target.startswith(module + ".")
    ]
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own submodules
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_file_is_imported_by_path():
    # The overlay is the import system's own finder: it maps a module name to this package's files.
    allowed = {REPO / "src/mimo_v2_flash_overlay/__init__.py", Path(__file__).resolve()}
    offenders = []
    for directory in ("src", "examples", "neuron_export", "benchmarks", "tests"):
        for path in (REPO / directory).rglob("*.py"):
            text = path.read_text()
            if path not in allowed and any(
                call in text for call in ("spec_from_file_location", "run_path(", "SourceFileLoader(")
            ):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
