"""Test helpers: build a Megatron model from an HF dir, run the oracle, read and edit checkpoints, run examples."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples/models/mimo_v2_flash"


def example_main(name: str) -> Callable:
    """``main`` of ``examples/models/mimo_v2_flash/<name>.py``, to run a command line in this process."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (all shards)."""
    state = {}
    for shard in Path(directory).glob("*.safetensors"):
        state.update(load_file(str(shard)))
    return state


def megatron_model(hf_dir: Path, dtype: torch.dtype = torch.float32, **layout):
    from megatron.bridge.models.mimo_v2_flash.inference import load_from_hf

    return load_from_hf(hf_dir, dtype, **layout)


def megatron_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocab fp32 logits ``[b, s, v]`` of our Megatron model loaded through the bridge."""
    model = megatron_model(hf_dir)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).float()


def hf_model(hf_dir: Path):
    """The oracle: transformers' native MiMoV2FlashForCausalLM, eager attention, fp32."""
    from transformers import MiMoV2FlashForCausalLM

    return MiMoV2FlashForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(hf_dir)(ids).logits.float()


def edit_checkpoint(
    src: Path,
    dst: Path,
    tensors: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    config: Callable[[dict], dict] | None = None,
) -> Path:
    """Copy an HF checkpoint, transforming tensors and/or config.json on the way."""
    shutil.copytree(src, dst)
    if tensors is not None:
        for shard in dst.glob("*.safetensors"):
            state = load_file(str(shard))
            save_file({k: tensors(k, v).contiguous() for k, v in state.items()}, str(shard), metadata={"format": "pt"})
    if config is not None:
        path = dst / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text())), indent=2))
    return dst
