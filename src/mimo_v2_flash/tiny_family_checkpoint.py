"""A tiny MiMo-V2 family checkpoint (``MiMoV2ForCausalLM`` / ``mimo_v2``, as MiMo-V2.5 and V2.6-Flash store it), made
from a tiny block-FP8 MiMo-V2-Flash one: each attention block's q/k/v fused into one ``qkv_proj`` of ``T`` rank
chunks, each chunk FP8-quantized on its own grid; vision / audio tower tensors beside the language model; optionally
the routed experts in MXFP4 (V2.6-Flash). For demos and tests of the family path; the weights are random.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mimo_v2_flash.tiny_checkpoint import tiny_config

FAMILY_OVERRIDES: dict[str, Any] = {
    # Two KV heads on full layers and four on SWA layers, so T = 2 chunks hold whole heads. Full-layer chunks
    # (2 x 24 + 24 + 16 = 88 rows) are not whole 16-row blocks: their per-chunk grid shows T in the scale shape;
    # SWA chunks (48 + 48 + 32 = 128 rows) are, as on MiMo-V2.5's SWA layers.
    "num_key_value_heads": 2,
    "swa_num_key_value_heads": 4,
    "rope_theta": 10_000_000.0,
    "max_position_embeddings": 1024,
}
TOWER_SHAPES = {
    "visual.patch_embed.proj.weight": (32, 48),
    "audio_encoder.layers.0.self_attn.q_proj.weight": (32, 32),
    "speech_embeddings.weight": (16, 32),
}


def family_tiny_config(**overrides: Any) -> dict[str, Any]:
    """:func:`tiny_config` with the KV heads of :data:`FAMILY_OVERRIDES` (what ``write_family_checkpoint`` needs)."""
    return tiny_config(**{**FAMILY_OVERRIDES, **overrides})


def write_family_checkpoint(fp8_src: str | Path, dst: str | Path, mxfp4: bool = False, seed: int = 0) -> Path:
    """Re-save a block-FP8 MiMo-V2-Flash checkpoint in the family's format (see the module docstring).

    ``T`` is the source's ``num_key_value_heads`` (as the family's configs state it).
    """
    from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
    from mimo_v2_flash.checkpoint.fp8_quantization import quantize_rows
    from mimo_v2_flash.checkpoint.fp8_scale_layouts import per_rank_rows
    from mimo_v2_flash.checkpoint.fused_qkv import fuse_qkv
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
    from mimo_v2_flash.checkpoint.mxfp4 import quantize_mxfp4, scale_name

    src, dst = Path(fp8_src), Path(dst)
    reader = FP8Checkpoint(HFCheckpoint(src))
    chunks, (bm, bn) = int(reader.checkpoint.config["num_key_value_heads"]), reader.block
    tensors: dict[str, torch.Tensor] = {}
    for name in reader.weight_names():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if name.endswith("self_attn.q_proj.weight"):
            q, k, v = (reader.get(name.replace("q_proj", f"{p}_proj")) for p in "qkv")
            fused = fuse_qkv(q, k, v, chunks)
            rows = fused.shape[0]
            quantized, scales = quantize_rows(
                {"w": fused}, {"w": per_rank_rows(rows, chunks, bm)}, chunks * math.ceil(rows // chunks / bm), bn
            )
            fused_name = name.replace("q_proj", "qkv_proj")
            tensors[fused_name], tensors[fused_name + "_scale_inv"] = quantized["w"], scales
        elif mxfp4 and ".mlp.experts." in name:
            tensors[name], tensors[scale_name(name)] = quantize_mxfp4(reader.get(name))
        else:
            tensors[name] = reader.checkpoint.get(name)
            if name + "_scale_inv" in reader.checkpoint:
                tensors[name + "_scale_inv"] = reader.checkpoint.get(name + "_scale_inv")
    gen = torch.Generator().manual_seed(seed)
    for name, shape in TOWER_SHAPES.items():
        tensors[name] = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    dst.mkdir(parents=True)
    names = sorted(tensors)
    mtp = [n for n in names if n.startswith("model.mtp.")]
    shards = {"model_pp0_ep0_shard0.safetensors": [n for n in names if n not in mtp], "model_mtp.safetensors": mtp}
    for shard, shard_names in shards.items():
        if shard_names:
            save_file({n: tensors[n].contiguous() for n in shard_names}, str(dst / shard), metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    metadata = {"total_size": sum((dst / s).stat().st_size for s in set(weight_map.values())), "tp_size": chunks}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(_family_config(reader.checkpoint.config, mxfp4), indent=2))
    for extra in src.iterdir():  # tokenizer and chat template
        if extra.is_file() and not extra.name.endswith(".safetensors") and not (dst / extra.name).exists():
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst


def _family_config(source: dict[str, Any], mxfp4: bool) -> dict[str, Any]:
    native_only = ("layer_types", "mlp_layer_types", "rope_parameters", "rms_norm_eps", "sliding_window")
    config = {k: v for k, v in source.items() if k not in native_only}
    quant = dict(config["quantization_config"], store_dtype="mxfp4" if mxfp4 else "fp8")
    if mxfp4:
        quant["mxfp4_block_size"] = 32
    config.update(
        architectures=["MiMoV2ForCausalLM"],
        model_type="mimo_v2",
        attention_projection_layout="fused_qkv",
        rope_scaling={"rope_type": "default", "type": "default"},
        n_shared_experts=None,
        auto_map={
            "AutoConfig": "configuration_mimo_v2.MiMoV2Config",
            "AutoModelForCausalLM": "modeling_mimo_v2.MiMoV2ForCausalLM",
        },
        vision_config={"hidden_size": 48, "depth": 1},
        audio_config={"hidden_size": 32},
        quantization_config=quant,
    )
    return config
