"""Test helpers: build a Megatron model from an HF dir, run the oracle, read and edit checkpoints, run examples."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (all shards)."""
    state = {}
    for shard in Path(directory).glob("*.safetensors"):
        state.update(load_file(str(shard)))
    return state


def megatron_model(hf_dir: Path, dtype: torch.dtype = torch.float32, **layout):
    from mimo_v2_flash.runtime.inference import load_from_hf

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


# config.json fields that the serving stacks' MiMo-V2 model files read without a default (an export lacking one
# fails to load before any weight is read), from their source:
#   vLLM vllm/model_executor/models/mimo_v2_flash.py (and mimo_v2.py, mimo_v2_flash_mtp.py, mimo_v2_mtp.py);
#   SGLang python/sglang/srt/models/mimo_v2_flash.py and mimo_v2_flash_nextn.py, plus SGLang's KV-cache sizing,
#   which reads swa_head_dim and swa_v_head_dim.
SERVING_REQUIRED_CONFIG_FIELDS = (
    "attention_bias",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "hybrid_layer_pattern",
    "intermediate_size",
    "layernorm_epsilon",
    "moe_intermediate_size",
    "n_group",
    "n_routed_experts",
    "norm_topk_prob",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "sliding_window_size",
    "swa_head_dim",
    "swa_num_attention_heads",
    "swa_num_key_value_heads",
    "swa_v_head_dim",
    "tie_word_embeddings",
    "topk_group",
    "topk_method",
    "vocab_size",
)
# Read with a default that would be wrong for MiMo-V2-Flash (e.g. swa_v_head_dim -> swa_head_dim, v_head_dim ->
# head_dim, sinks off, no value scale, rope_theta 1e6, partial_rotary_factor 1.0, max positions 32768).
SERVING_DEFAULTED_CONFIG_FIELDS = (
    "v_head_dim",
    "add_swa_attention_sink_bias",
    "add_full_attention_sink_bias",
    "attention_value_scale",
    "rope_theta",
    "swa_rope_theta",
    "partial_rotary_factor",
    "max_position_embeddings",
    "moe_layer_freq",
)


def missing_serving_fields(config: dict) -> list[str]:
    """Fields vLLM / SGLang need that ``config`` lacks (``pad_token_id`` must exist, SGLang reads it; null is fine)."""
    fields = SERVING_REQUIRED_CONFIG_FIELDS + SERVING_DEFAULTED_CONFIG_FIELDS
    missing = [name for name in fields if config.get(name) is None]
    return missing + ([] if "pad_token_id" in config else ["pad_token_id"])


def skip_unless_ranks_fit(nproc: int) -> None:
    """torchrun tests run one process per GPU on a CUDA host (NCCL), or on the CPU with gloo where there is no CUDA."""
    import pytest

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        pytest.skip(
            f"needs {nproc} GPUs on a CUDA host ({torch.cuda.device_count()} here); CPU hosts run it with gloo"
        )
