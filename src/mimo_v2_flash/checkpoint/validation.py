"""Check a MiMo-V2-Flash HF checkpoint against its config before any weight is read.

Every tensor the architecture needs must be present with the right shape and a floating dtype (FP8 weights
with their scale), and nothing unknown may be there, except the MiMo-V2.5 towers (vision, audio), which are not
part of the language model: they are reported and left alone. Problems raise :class:`CheckpointError` naming
the file and the tensor.
"""

from __future__ import annotations

import torch

from mimo_v2_flash.checkpoint.fp8 import FP8_DTYPE, FP8Checkpoint
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint, count_mtp_layers
from mimo_v2_flash.config import (
    FUSED_PROJECTIONS,
    SLIDING_ATTENTION,
    MiMoV2FlashArchitecture,
    MiMoV2FlashConfigError,
    parse_architecture,
    projection_layout,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)
TOWER_PREFIXES = ("visual.", "audio_encoder.", "speech_embeddings.")
"""MiMo-V2.5's vision and audio towers: not part of the Megatron model, copied through by every export."""


def tower_tensors(names) -> list[str]:
    """The names (weights and scales) that belong to MiMo-V2.5's vision and audio towers."""
    return sorted(n for n in names if n.startswith(TOWER_PREFIXES))


def tower_counts(names) -> dict[str, int]:
    """Tensors per tower prefix (``visual``, ``audio_encoder``, ``speech_embeddings``), those present only."""
    towers = tower_tensors(names)
    counts = {prefix.rstrip("."): sum(n.startswith(prefix) for n in towers) for prefix in TOWER_PREFIXES}
    return {prefix: count for prefix, count in counts.items() if count}


def _attention(
    prefix: str, arch: MiMoV2FlashArchitecture, sliding: bool, fused_qkv: bool = False
) -> dict[str, tuple[int, ...]]:
    kv = arch.swa_num_kv_heads if sliding else arch.full_num_kv_heads
    h, heads, dk, dv = arch.hidden_size, arch.num_attention_heads, arch.head_dim, arch.v_head_dim
    projections = {"q_proj": heads * dk, "k_proj": kv * dk, "v_proj": kv * dv}
    if fused_qkv:
        projections = {"qkv_proj": sum(projections.values())}
    shapes = {
        f"{prefix}input_layernorm.weight": (h,),
        **{f"{prefix}self_attn.{name}.weight": (rows, h) for name, rows in projections.items()},
        f"{prefix}self_attn.o_proj.weight": (h, heads * dv),
    }
    if arch.swa_attention_sink if sliding else arch.full_attention_sink:
        shapes[f"{prefix}self_attn.attention_sink_bias"] = (heads,)
    return shapes


def _dense_mlp(prefix: str, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (ffn, hidden),
        f"{prefix}up_proj.weight": (ffn, hidden),
        f"{prefix}down_proj.weight": (hidden, ffn),
    }


def expected_tensors(
    arch: MiMoV2FlashArchitecture, mtp_layers: int, fused_qkv: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every hub tensor name of the architecture and its shape (weights only, no FP8 scales); ``fused_qkv``: one
    ``qkv_proj`` per attention block (the MiMo-V2 family) instead of ``q_proj``/``k_proj``/``v_proj``."""
    h = arch.hidden_size
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i, (kind, moe) in enumerate(zip(arch.layer_types, arch.moe_layers, strict=True)):
        p = f"model.layers.{i}."
        shapes.update(_attention(p, arch, kind == SLIDING_ATTENTION, fused_qkv))
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
        if moe:
            shapes[f"{p}mlp.gate.weight"] = (arch.num_experts, h)
            shapes[f"{p}mlp.gate.e_score_correction_bias"] = (arch.num_experts,)
            for e in range(arch.num_experts):
                shapes.update(_dense_mlp(f"{p}mlp.experts.{e}.", h, arch.moe_ffn_hidden_size))
        else:
            shapes.update(_dense_mlp(f"{p}mlp.", h, arch.ffn_hidden_size))
    for i in range(mtp_layers):
        p = f"model.mtp.layers.{i}."
        shapes.update(_attention(p, arch, sliding=True, fused_qkv=fused_qkv))
        shapes.update(_dense_mlp(f"{p}mlp.", h, arch.ffn_hidden_size))
        shapes.update({f"{p}{n}.weight": (h,) for n in ("enorm", "hnorm", "pre_mlp_layernorm", "final_layernorm")})
        shapes[f"{p}eh_proj.weight"] = (h, 2 * h)
    return shapes


def validate_checkpoint(checkpoint: HFCheckpoint) -> tuple[MiMoV2FlashArchitecture, int]:
    """Validate config and tensors; returns the architecture and the number of MTP layers."""

    reader = FP8Checkpoint(checkpoint)  # every FP8 weight has its scale and every scale its weight
    try:
        arch = parse_architecture(checkpoint.config)
        fused_qkv = projection_layout(checkpoint.config) == FUSED_PROJECTIONS
    except MiMoV2FlashConfigError as error:
        raise CheckpointError(f"{checkpoint.directory / 'config.json'}: {error}") from None
    if fused_qkv:
        reader.fused_chunks()  # whole heads per chunk
    weights = reader.weight_names()
    try:
        mtp_layers = count_mtp_layers(weights)
    except ValueError as error:
        raise CheckpointError(f"{checkpoint.directory}: {error}") from None
    stated = checkpoint.config.get("num_nextn_predict_layers")
    if mtp_layers and isinstance(stated, int) and stated != mtp_layers:
        # A checkpoint without MTP weights is fine (conversions often drop them); one with other counts is not.
        raise CheckpointError(
            f"{checkpoint.directory}: {mtp_layers} MTP layer(s) in the weights, config.json states "
            f"num_nextn_predict_layers={stated}"
        )
    expected = expected_tensors(arch, mtp_layers, fused_qkv)
    for name, shape in expected.items():
        if name not in checkpoint:
            raise CheckpointError(f"{checkpoint.directory}: tensor {name} is missing (required by config.json)")
        if reader.logical_shape(name) != shape:
            raise CheckpointError(
                f"{checkpoint.file_of(name)}: tensor {name} has shape {reader.logical_shape(name)}, "
                f"config.json implies {shape}"
            )
        if checkpoint.dtype(name) not in FLOAT_DTYPES and not reader.is_mxfp4(name):
            raise CheckpointError(f"{checkpoint.file_of(name)}: tensor {name} has dtype {checkpoint.dtype(name)}")
    unknown = sorted(set(weights) - set(expected) - set(tower_tensors(weights)))
    if unknown:
        raise CheckpointError(f"{checkpoint.file_of(unknown[0])}: unexpected tensor {unknown[0]} (unknown layout)")
    return arch, mtp_layers
