"""The import overlay: our MiMo-V2-Flash package replaces upstream's, and the TE shim stays confined."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_package_resolves_to_this_repository():
    path = _run("import megatron.bridge.models.mimo_v2_flash as m; print(m.__file__)")
    assert Path(path).resolve() == REPO / "src/megatron/bridge/models/mimo_v2_flash/__init__.py"


def test_upstream_files_are_never_executed_and_registry_holds_ours():
    out = _run(
        "import sys, megatron.bridge\n"
        "from megatron.bridge.models.conversion.model_bridge import get_model_bridge\n"
        "from megatron.bridge.models.mimo_v2_flash import MiMoV2FlashBridge\n"
        "ours = 'src/megatron/bridge/models/mimo_v2_flash/'\n"
        "package = 'megatron.bridge.models.mimo_v2_flash'\n"
        "upstream = [n for n, m in list(sys.modules.items()) if n.startswith(package)\n"
        "            and ours not in (getattr(m, '__file__', None) or ours)]\n"
        "print(upstream, MiMoV2FlashBridge.__module__, MiMoV2FlashBridge.__code__ if False else '')"
    )
    assert out.startswith("[] megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformer_engine") is not None, reason="TE installed: no shim"
)
def test_te_shim_is_confined_to_lora_layers():
    out = _run(
        "import sys, importlib.util, megatron.bridge\n"
        "import megatron.bridge.peft.lora_layers as lora\n"
        "from megatron.core.models.gpt import gpt_layer_specs\n"
        "from megatron.core.transformer import attention\n"
        "print('transformer_engine' in sys.modules, importlib.util.find_spec('transformer_engine') is None,"
        " gpt_layer_specs.HAVE_TE, attention.HAVE_TE, getattr(lora.te, '__mimo_v2_flash_stand_in__', False))"
    )
    assert out == "False True False False True"


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("nvidia_resiliency_ext") is not None, reason="installed: no stand-in"
)
def test_training_loop_imports_without_resiliency_ext():
    out = _run(
        "import sys, importlib.util\n"
        "import megatron.bridge.training.finetune, megatron.bridge.training.pretrain as pretrain\n"
        "print('nvidia_resiliency_ext' in sys.modules, importlib.util.find_spec('nvidia_resiliency_ext') is None,"
        " pretrain.CallWrapper.__module__)"
    )
    assert out == "False True mimo_v2_flash_overlay"


def test_stand_in_te_classes_cannot_be_instantiated():
    out = _run(
        "import megatron.bridge.peft.lora_layers as lora\n"
        "try:\n    lora.te.Linear(1, 1)\nexcept ImportError as e:\n    print('refused')"
    )
    assert out == "refused"
