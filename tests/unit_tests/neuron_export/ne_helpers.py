"""Shared helpers for the neuron_export tests: tiny checkpoints, the released config, the fake NxDI SDK."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimo_v2_flash import tiny_checkpoint
from mimo_v2_flash.checkpoint import fp8 as fp8_checkpoint
from mimo_v2_flash.checkpoint import hf_checkpoint

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
FAKE_NXDI = HERE / "fake_nxdi"
FULL_LAYERS = {0, 5, 11, 17, 23, 29, 35, 41, 47}
# The released MiMo-V2-Flash config.json (architecture fields; see /work/shared/reference facts and the model card).
REAL_CONFIG = {
    "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
    "hidden_size": 4096, "intermediate_size": 16384, "moe_intermediate_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 64, "num_key_value_heads": 4, "swa_num_key_value_heads": 8, "head_dim": 192,
    "v_head_dim": 128, "hybrid_layer_pattern": [0 if i in FULL_LAYERS else 1 for i in range(48)],
    "moe_layer_freq": [0] + [1] * 47, "n_routed_experts": 256, "num_experts_per_tok": 8, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": None,
    "sliding_window": 128, "sliding_window_size": 128, "rope_theta": 5000000, "swa_rope_theta": 10000,
    "partial_rotary_factor": 0.334, "layernorm_epsilon": 1e-5, "attention_value_scale": 0.707,
    "add_full_attention_sink_bias": False, "add_swa_attention_sink_bias": True, "max_position_embeddings": 262144,
    "vocab_size": 152576, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}  # fmt: skip


def build_checkpoints(root: Path) -> dict[str, Path]:
    """Tiny source (fp32, 1 MTP layer), its FP8 release-like copy, and both prepared (FP8 one with MTP kept)."""
    from neuron_export.prepare import prepare

    tiny = tiny_checkpoint
    source = tiny.write_tiny_checkpoint(root / "source", mtp_layers=1, seed=7)
    fp8 = tiny.write_fp8_checkpoint(source, root / "fp8", block=(16, 16))
    prepare(source, root / "prepared")
    prepare(fp8, root / "prepared_fp8", keep_mtp=True, max_shard_bytes=100_000)
    return {"source": source, "fp8": fp8, "prepared": root / "prepared", "prepared_fp8": root / "prepared_fp8"}


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(directory / shard), framework="pt") as handle:
            weights.update({k: handle.get_tensor(k) for k in handle.keys()})
    return weights


def dequantized(directory: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a (possibly FP8) checkpoint, scales folded in (project reader)."""
    reader = fp8_checkpoint.FP8Checkpoint(hf_checkpoint.HFCheckpoint(directory))
    return {name: reader.get(name, torch.float32) for name in reader.weight_names()}


def config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def edit_tensors(directory: Path, edit) -> None:
    """Rewrite every shard (and the index) with ``edit(dict) -> dict``."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        state = edit(dict(load_file(str(directory / shard))))
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in state})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index))


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def fake_sdk_env() -> dict[str, str]:
    """``PYTHONPATH`` that makes the fake NxDI SDK (and the reference forward it decodes with) importable."""
    paths = [str(FAKE_NXDI), str(HERE), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def import_fake_adapter():
    """Import the fake SDK in this process (callers restore ``sys.path`` / ``sys.modules``)."""
    for path in (str(FAKE_NXDI), str(HERE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import modeling_mimo_v2
    from neuronx_distributed_inference.models import config as nxdi_config
    from neuronx_distributed_inference.utils import hf_adapter

    return modeling_mimo_v2, nxdi_config, hf_adapter
