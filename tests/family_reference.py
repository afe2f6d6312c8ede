"""A MiMo-V2 family (V2.5-shaped) checkpoint built for the tests from a split MiMo-V2-Flash one, written from the
family's description (``shared/reference/mimo_v2_family_facts.md``), no code shared with the package.

Every attention block's q/k/v become one ``self_attn.qkv_proj``: ``T`` chunks, chunk ``c`` = the rows of rank
``c``'s query heads, then its KV heads' K rows, then their V rows, each chunk FP8-quantized on its own grid
(``tests/fp8_reference.quantize_grid``). The oracle checkpoint is the split source with q/k/v replaced by the
reference dequantization of those chunks, so both describe the same model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from fp8_reference import dequantize_grid, quantize_grid
from mimo_testing import hf_state_dict
from mxfp4_reference import reference_decode, reference_quantize
from safetensors.torch import save_file

from mimo_v2_flash.tiny_checkpoint import tiny_config

BLOCK = (16, 16)
# V2.5-shaped at tiny size, T = 2 chunks. Full layers (2 KV heads): chunk = 2x16 + 1x16 + 1x8 = 56 rows, 4 blocks
# per chunk, 8 scale rows where a plain grid of the 112 rows gives 7. SWA and MTP layers (4 KV heads): chunk =
# 32 + 32 + 16 = 80 rows, whole blocks, so the scale shape is the same for every T and only T tells the row order.
# Value scale and full-layer RoPE base as MiMo-V2.5-Pro / V2.5 state them.
FAMILY = tiny_config(
    num_key_value_heads=2,
    swa_num_key_value_heads=4,
    head_dim=16,
    v_head_dim=8,
    partial_rotary_factor=0.5,
    rope_theta=10_000_000.0,
    attention_value_scale=0.612,
)

TOWERS = {
    "visual.patch_embed.proj.weight": (16, 12),
    "visual.blocks.0.attn.qkv.weight": (36, 12),
    "audio_encoder.layers.0.fc1.weight": (20, 8),
    "speech_embeddings.weight": (10, 8),
}
REMOTE_CODE = {
    "AutoConfig": "configuration_mimo_v2.MiMoV2Config",
    "AutoModelForCausalLM": "modeling_mimo_v2.MiMoV2ForCausalLM",
}
EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
NATIVE_ONLY_FIELDS = ("layer_types", "mlp_layer_types", "rope_parameters", "rms_norm_eps", "sliding_window")


def chunked(tensor: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    return [tensor[i * tensor.shape[0] // chunks : (i + 1) * tensor.shape[0] // chunks] for i in range(chunks)]


def write_family_checkpoint(
    src: Path,
    dst: Path,
    oracle: Path,
    chunks: int,
    block: tuple[int, int],
    index_tp_size: int | None = None,
    mxfp4: bool = False,
) -> None:
    """``dst``: the family checkpoint; ``oracle``: the split checkpoint of the same (dequantized) weights.

    ``mxfp4``: routed experts as MiMo-V2.6-Flash stores them (uint8 E2M1 pairs, E8M0 ``weight_scale``).
    """
    state = hf_state_dict(src)
    family, truth = {}, {}
    for name, tensor in state.items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if mxfp4 and EXPERT.match(name):
            packed, scales = (torch.tensor(t, dtype=torch.uint8) for t in reference_quantize(tensor, "ocp"))
            family[name], family[name + "_scale"] = packed, scales
            truth[name] = reference_decode(packed, scales).float()
            continue
        if not name.endswith("self_attn.q_proj.weight"):
            family[name], truth[name] = tensor, tensor
            continue
        prefix = name[: -len("q_proj.weight")]
        parts = [chunked(state[prefix + p + "_proj.weight"], chunks) for p in "qkv"]
        fp8_chunks, scale_chunks, dequantized = [], [], {p: [] for p in "qkv"}
        for c in range(chunks):
            rows = [parts[i][c] for i in range(3)]
            fp8, scale = quantize_grid(torch.cat(rows), block)
            fp8_chunks.append(fp8)
            scale_chunks.append(scale)
            values = dequantize_grid(fp8, scale, block)
            start = 0
            for p, r in zip("qkv", rows, strict=True):
                dequantized[p].append(values[start : start + r.shape[0]])
                start += r.shape[0]
        family[prefix + "qkv_proj.weight"] = torch.cat(fp8_chunks)
        family[prefix + "qkv_proj.weight_scale_inv"] = torch.cat(scale_chunks)
        for p in "qkv":
            truth[prefix + p + "_proj.weight"] = torch.cat(dequantized[p])
    gen = torch.Generator().manual_seed(5)
    for name, shape in TOWERS.items():
        family[name] = torch.randn(*shape, generator=gen).to(torch.bfloat16)

    config = json.loads((src / "config.json").read_text())
    oracle.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in truth.items()}, str(oracle / "model.safetensors"))
    (oracle / "config.json").write_text(json.dumps(config))

    dst.mkdir(parents=True)
    names = sorted(family)
    shards = {f"model_pp0_ep0_shard{i}.safetensors": names[i::2] for i in range(2)}
    for shard, shard_names in shards.items():
        save_file({n: family[n].contiguous() for n in shard_names}, str(dst / shard))
    index = {"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}
    if index_tp_size is not None:
        index["metadata"]["tp_size"] = index_tp_size
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    family_config = {k: v for k, v in config.items() if k not in NATIVE_ONLY_FIELDS}
    family_config.update(
        architectures=["MiMoV2ForCausalLM"],
        model_type="mimo_v2",
        attention_projection_layout="fused_qkv",
        rope_scaling={"rope_type": "default", "type": "default"},
        n_shared_experts=None,
        hybrid_block_size=None,
        auto_map=REMOTE_CODE,
        vision_config={"depth": 1, "hidden_size": 12},
        audio_config={"hidden_size": 8},
        quantization_config={
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "store_dtype": "fp8",
            "weight_block_size": list(block),
        },
    )
    if mxfp4:
        family_config["quantization_config"].update(store_dtype="mxfp4", mxfp4_block_size=32)
    (dst / "config.json").write_text(json.dumps(family_config))
    for extra in src.iterdir():  # tokenizer and chat template
        if extra.is_file() and not extra.name.endswith(".safetensors") and not (dst / extra.name).exists():
            (dst / extra.name).write_bytes(extra.read_bytes())
