"""The built wheel coexists with megatron-bridge: it ships nothing under ``megatron/``, and installing,
reinstalling and uninstalling either, in any order, leaves both intact while ``AutoBridge`` dispatches to this
project's bridge exactly while it is installed (unless ``MIMO_V2_FLASH_OVERLAY=0``)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_PACKAGE = REPO / "src/megatron/bridge/models/mimo_v2_flash"
PIP = [sys.executable, "-m", "pip"]
pytestmark = pytest.mark.slow


def _pip(*args: str) -> None:
    result = subprocess.run([*PIP, *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """This project's wheel, built from the source tree, and megatron-bridge's (from pip's cache or index)."""
    out = tmp_path_factory.mktemp("wheels")
    _pip("wheel", "--no-deps", "-q", "-w", str(out / "ours"), str(REPO))
    version = importlib.metadata.version("megatron-bridge")
    _pip("download", "--no-deps", "-q", "-d", str(out / "upstream"), f"megatron-bridge=={version}")
    return {"ours": next((out / "ours").glob("*.whl")), "upstream": next((out / "upstream").glob("*.whl"))}


def test_wheel_ships_nothing_under_megatron(wheels):
    names = zipfile.ZipFile(wheels["ours"]).namelist()
    assert not [name for name in names if name.startswith("megatron/")]
    shipped = {name.split("model_package/", 1)[1] for name in names if "/model_package/" in name}
    in_tree = {str(p.relative_to(MODEL_PACKAGE)) for p in MODEL_PACKAGE.rglob("*.py")}
    assert shipped == in_tree
    assert "zz_mimo_v2_flash_overlay.pth" in names
    assert {name.split("/")[0] for name in names} == {
        "mimo_v2_flash",
        "mimo_v2_flash_overlay",
        "neuron_export",
        "zz_mimo_v2_flash_overlay.pth",
        f"{wheels['ours'].name.split('-')[0]}-{wheels['ours'].name.split('-')[1]}.dist-info",
    }


def _scratch_venv(root: Path) -> tuple[Path, Path]:
    """A venv whose heavy dependencies (torch, megatron-core, ...) are this environment's, read through a .pth.

    The dependency view links every installed top-level entry except megatron-bridge's and this project's, so
    what the sequence installs and removes in the scratch venv is the only copy of those two.
    """
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv/bin/python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    ours_or_upstream = {
        "megatron_bridge",
        "mimo_v2_flash",
        "_mimo_v2_flash_bridge",
        "zz_mimo_v2_flash_overlay",
        "neuron_export",
    }
    deps = root / "deps"
    (deps / "megatron").mkdir(parents=True)
    installed = Path(sysconfig.get_paths()["purelib"])
    for entry in installed.iterdir():
        stem = entry.name.split("-")[0].split(".")[0]
        if entry.name == "megatron":
            for part in entry.iterdir():
                if part.name != "bridge":
                    (deps / "megatron" / part.name).symlink_to(part)
        elif (
            stem not in ours_or_upstream
            and not stem.startswith(("__editable__", "mimo_v2_flash"))
            and entry.suffix != ".pth"
        ):
            (deps / entry.name).symlink_to(entry)
    (site / "dependencies.pth").write_text(f"{deps}\n")
    return python, site


def _intact(site: Path, name: str) -> list[str]:
    """Files of an installed distribution whose bytes differ from its RECORD (empty: intact)."""
    dist = next(importlib.metadata.distributions(name=name, path=[str(site)]))
    broken = []
    for file in dist.files:
        if file.hash is None:
            continue
        path = Path(dist.locate_file(file))
        digest = base64.urlsafe_b64encode(hashlib.new(file.hash.mode, path.read_bytes()).digest()).rstrip(b"=")
        if not path.is_file() or digest.decode() != file.hash.value:
            broken.append(str(file))
    return broken


def _bridge_package(python: Path, overlay: str | None = None) -> str:
    """Where ``megatron.bridge.models.mimo_v2_flash`` (the bridge AutoBridge registers) comes from."""
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("PYTHONPATH")
    if overlay is not None:
        env["MIMO_V2_FLASH_OVERLAY"] = overlay
    code = (
        "import megatron.bridge, sys\n"
        "from megatron.bridge.models.conversion.model_bridge import get_model_bridge\n"
        "print(sys.modules['megatron.bridge.models.mimo_v2_flash'].__file__)"
    )
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=python.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_install_reinstall_uninstall_in_any_order(wheels, tmp_path):
    python, site = _scratch_venv(tmp_path)
    target = ["--python", str(python), "install", "--no-deps", "-q"]
    ours = str(site / "mimo_v2_flash_overlay/model_package/__init__.py")
    upstream = str(site / "megatron/bridge/models/mimo_v2_flash/__init__.py")

    _pip(*target, str(wheels["upstream"]))
    _pip(*target, str(wheels["ours"]))
    assert _intact(site, "megatron-bridge") == [] and _intact(site, "mimo-v2-flash-bridge") == []
    assert _bridge_package(python) == ours
    assert _bridge_package(python, overlay="0") == upstream

    _pip(*target, "--force-reinstall", str(wheels["upstream"]))  # e.g. a container upgrade
    assert _intact(site, "megatron-bridge") == [] and _intact(site, "mimo-v2-flash-bridge") == []
    assert _bridge_package(python) == ours

    _pip("--python", str(python), "uninstall", "-y", "-q", "megatron-bridge")
    assert _intact(site, "mimo-v2-flash-bridge") == [] and not (site / "megatron/bridge").exists()
    _pip(*target, str(wheels["upstream"]))
    assert _intact(site, "megatron-bridge") == []
    assert _bridge_package(python) == ours

    _pip("--python", str(python), "uninstall", "-y", "-q", "mimo-v2-flash-bridge")
    assert _intact(site, "megatron-bridge") == []
    assert not (site / "mimo_v2_flash_overlay").exists() and not (site / "zz_mimo_v2_flash_overlay.pth").exists()
