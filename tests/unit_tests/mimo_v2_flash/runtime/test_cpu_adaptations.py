"""The CPU adaptations: patched only inside ``cpu_runtime``, restored on exit, and refused on a changed upstream."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mimo_v2_flash.runtime import cpu_adaptations
from mimo_v2_flash.runtime.cpu_adaptations import Patch, UpstreamChanged, cpu_runtime, patched

ALL_PATCHES = cpu_adaptations.TORCH_PATCHES + cpu_adaptations.TRAINING_PATCHES + cpu_adaptations.PEFT_PATCHES


def _in_fresh_process(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host without CUDA")
def test_patches_exist_only_inside_the_block():
    out = _in_fresh_process(
        "import torch\n"
        "from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime\n"
        "from megatron.bridge.training import setup\n"
        "before = (torch.cuda.current_device, setup.initialize_megatron, 'cuda' in vars(torch.Tensor))\n"
        "with cpu_runtime(training=True, peft=True) as applied:\n"
        "    inside = (str(torch.cuda.current_device()), torch.ones(2).cuda().device.type,\n"
        "              setup.initialize_megatron.keywords, len(applied))\n"
        "    with cpu_runtime():\n"
        "        pass\n"
        "    still = str(torch.cuda.current_device())\n"
        "after = (torch.cuda.current_device, setup.initialize_megatron, 'cuda' in vars(torch.Tensor))\n"
        "print(inside, still, after == before, before[2])\n"
    )
    assert out == f"('cpu', 'cpu', {{'allow_no_cuda': True}}, {len(ALL_PATCHES)}) cpu True False"


def test_a_missing_upstream_target_is_refused_and_nothing_stays_patched():
    marker = object()
    holder = type("Holder", (), {"kept": marker})
    sys.modules["_adaptation_test_module"] = type(sys)("_adaptation_test_module")
    sys.modules["_adaptation_test_module"].Holder = holder
    good = Patch("_adaptation_test_module:Holder", "kept", lambda original: "patched", lambda: True, "test 1.0")
    renamed = Patch("_adaptation_test_module:Holder", "renamed", lambda original: None, lambda: True, "test 1.0")
    try:
        with pytest.raises(UpstreamChanged, match=r"Holder\.renamed not found \(patch written for test 1\.0\)"):
            with patched((good, renamed)):
                pass
        assert holder.kept is marker and not hasattr(holder, "renamed")
    finally:
        del sys.modules["_adaptation_test_module"]


def test_nothing_is_patched_on_a_cuda_host_with_transformer_engine(monkeypatch):
    monkeypatch.setattr(cpu_adaptations, "cuda_absent", lambda: False)
    monkeypatch.setattr(cpu_adaptations, "transformer_engine_absent", lambda: False)
    monkeypatch.setattr(cpu_adaptations, "prebuilt_dataset_helpers", lambda: False)
    with cpu_runtime(training=True, peft=True) as applied:
        assert applied == []


def test_every_patch_is_in_the_module_table():
    table = cpu_adaptations.__doc__
    for patch in ALL_PATCHES:
        owner = patch.owner.replace(":", ".").rsplit(".", 1)[-1]
        assert f"{owner}.{patch.name}``" in table, patch
