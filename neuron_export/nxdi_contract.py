"""What NxDI's MiMo-V2-Flash adapter expects from a checkpoint, and the mapping from the hub layout to it.

The adapter is ``contrib/models/MiMo-V2-Flash/src/modeling_mimo_v2.py`` of aws-neuron/neuronx-distributed-inference
(PRs #119/#137, read at commit c303b52). Facts used here, each from that file:

* ``MiMoV2InferenceConfig.get_required_attributes()`` lists :data:`REQUIRED_CONFIG_FIELDS`; ``InferenceConfig``
  asserts they are all present. ``MiMoV2MLP`` sizes the dense layer from ``dense_intermediate_size`` (falling back
  to ``intermediate_size * 8`` after the config overwrote ``intermediate_size`` with the expert size).
  ``attention_value_scale`` is read with ``float(getattr(config, "attention_value_scale", 1.0))``, so it must be a
  number, never null; the sink flags ``add_{full,swa}_attention_sink_bias`` are read with defaults, so they are
  written explicitly. SWA layers mask ``col >= row - sliding_window + 1``: ``sliding_window`` counts the query
  itself, i.e. it is the transformers >= 5.20 value ``W + 1`` for a window of ``W`` previous tokens.
* ``convert_mimo_v2_hf_to_neuron_state_dict`` renames ``mlp.gate.weight`` to ``mlp.router.linear_router.weight``,
  fuses the per-expert ``experts.N.{gate,up,down}_proj`` itself and replicates K/V heads itself when
  ``tp_degree > num_kv_heads`` (it is not idempotent: inputs must keep hub shapes). It does not touch
  ``mlp.gate.e_score_correction_bias``; the router bias parameter its ``_apply_router_noaux_tc_fix`` adds to
  ``RouterTopK`` loads from ``mlp.router.e_score_correction_bias`` (the name its FP8 preprocess script writes).
* ``get_state_dict`` strips the leading ``model.`` and loads ``model.safetensors.index.json`` of the directory
  (sub-directories are not read). ``tie_word_embeddings`` true is not supported by this model.
"""

from __future__ import annotations

import re
from typing import Any

REQUIRED_CONFIG_FIELDS = (
    "attention_bias",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "hybrid_layer_pattern",
    "layernorm_epsilon",
    "max_position_embeddings",
    "moe_intermediate_size",
    "moe_layer_freq",
    "n_routed_experts",
    "norm_topk_prob",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "partial_rotary_factor",
    "rope_theta",
    "scoring_func",
    "sliding_window",
    "swa_head_dim",
    "swa_num_attention_heads",
    "swa_num_key_value_heads",
    "swa_rope_theta",
    "swa_v_head_dim",
    "tie_word_embeddings",
    "v_head_dim",
    "vocab_size",
)
EXTRA_CONFIG_FIELDS = (
    "dense_intermediate_size",
    "attention_value_scale",
    "add_full_attention_sink_bias",
    "add_swa_attention_sink_bias",
)
HUB_ROUTER_BIAS = "mlp.gate.e_score_correction_bias"
NXDI_ROUTER_BIAS = "mlp.router.e_score_correction_bias"
MTP_PREFIX = "model.mtp."
MTP_DIR = "mtp"
MIMO_MODEL_TYPES = ("mimo_v2_flash", "mimo_v2")
MIMO_ARCHITECTURES = ("MiMoV2FlashForCausalLM", "MiMoV2ForCausalLM")
# A MiMo-V2 family source (MiMo-V2.5 / V2.6-Flash text backbone) is prepared as the MiMo-V2-Flash model it is: its
# q/k/v split out of the fused qkv_proj, its towers left out, its config in V2-Flash's identity (transformers, which
# NxDI's config loading goes through, has no ``mimo_v2`` model, and the remote code is never used).
FAMILY_ONLY_CONFIG_FIELDS = ("auto_map", "attention_projection_layout", "rope_scaling")
_ROUTER_BIAS = re.compile(r"^(model\.layers\.\d+\.)" + re.escape(HUB_ROUTER_BIAS) + "$")
_PREPARED_ROUTER_BIAS = re.compile(r"^(model\.layers\.\d+\.)" + re.escape(NXDI_ROUTER_BIAS) + "$")


def is_mtp(name: str) -> bool:
    """Whether a hub tensor belongs to a multi-token-prediction layer (NxDI has no MTP)."""
    return name.startswith(MTP_PREFIX)


def prepared_name(name: str) -> str:
    """The tensor name NxDI's adapter loads for a hub name (everything but the router bias is unchanged)."""
    return _ROUTER_BIAS.sub(r"\1" + NXDI_ROUTER_BIAS, name)


def hub_name(name: str) -> str:
    """Inverse of :func:`prepared_name`."""
    return _PREPARED_ROUTER_BIAS.sub(r"\1" + HUB_ROUTER_BIAS, name)


def is_router_bias(name: str) -> bool:
    return bool(_ROUTER_BIAS.match(name) or _PREPARED_ROUTER_BIAS.match(name))


def output_dtype_name(name: str) -> str:
    """Dtype of a prepared tensor: the router correction bias stays fp32 (as released), the rest is BF16."""
    return "float32" if is_router_bias(name) else "bfloat16"


def is_mimo_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") in MIMO_MODEL_TYPES or any(
        a in MIMO_ARCHITECTURES for a in cfg.get("architectures") or ()
    )


def identity_problem(cfg: dict[str, Any]) -> str | None:
    """A one-line reason when ``config.json`` does not describe a MiMo-V2-Flash model."""
    if is_mimo_config(cfg):
        return None
    return (
        f"not a MiMo-V2-Flash checkpoint (model_type {cfg.get('model_type')!r}, architectures "
        f"{cfg.get('architectures')!r}; expected model_type 'mimo_v2_flash' / MiMoV2FlashForCausalLM, or the MiMo-V2 "
        "family's 'mimo_v2' / MiMoV2ForCausalLM)"
    )


def unsupported_by_adapter(arch) -> list[str]:
    """Architecture values the adapter silently ignores or cannot represent (parse_architecture checks the rest)."""
    problems = []
    if arch.routed_scaling_factor != 1.0:
        problems.append(
            f"routed_scaling_factor={arch.routed_scaling_factor} is ignored by NxDI's MiMo adapter "
            "(its router has no scaling); only null/1.0 can be deployed"
        )
    if arch.num_experts == 0 or not any(arch.moe_layers):
        problems.append("NxDI's MiMo adapter needs MoE layers (n_routed_experts > 0 and moe_layer_freq with a 1)")
    return problems


def nxdi_config(original: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for the prepared checkpoint: hub + native fields, every field the adapter reads, BF16.

    Built on the project's ``hf_export.export_config`` (drops ``quantization_config``, writes the hub form and
    the transformers-native fields of the same architecture, ``torch_dtype``).
    """
    import torch

    from mimo_v2_flash import config as mimo_config
    from mimo_v2_flash.checkpoint import hf_writer

    arch = mimo_config.parse_architecture(original)
    if mimo_config.projection_layout(original) == mimo_config.FUSED_PROJECTIONS:
        original = {k: v for k, v in original.items() if k not in FAMILY_ONLY_CONFIG_FIELDS}
        original.update(architectures=[MIMO_ARCHITECTURES[0]], model_type=MIMO_MODEL_TYPES[0])
    config = hf_writer.export_config(original, torch.bfloat16)
    config.update(
        attention_bias=False,
        head_dim=arch.head_dim,
        v_head_dim=arch.v_head_dim,
        swa_head_dim=arch.head_dim,
        swa_v_head_dim=arch.v_head_dim,
        swa_num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.full_num_kv_heads,
        swa_num_key_value_heads=arch.swa_num_kv_heads,
        hidden_act=arch.hidden_act,
        max_position_embeddings=arch.max_position_embeddings,
        moe_intermediate_size=arch.moe_ffn_hidden_size,
        n_routed_experts=arch.num_experts,
        num_experts_per_tok=arch.moe_topk,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        sliding_window=arch.sliding_window_size + 1,
        tie_word_embeddings=False,
        dense_intermediate_size=arch.ffn_hidden_size,
        attention_value_scale=1.0 if arch.attention_value_scale is None else float(arch.attention_value_scale),
        add_full_attention_sink_bias=arch.full_attention_sink,
        add_swa_attention_sink_bias=arch.swa_attention_sink,
        torch_dtype="bfloat16",
    )
    missing = [f for f in REQUIRED_CONFIG_FIELDS + EXTRA_CONFIG_FIELDS if config.get(f) is None]
    if missing:  # only reachable if export_config changes; kept as a guard
        raise ValueError(f"normalized config lacks {missing}")
    return config


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Why a config is not one the adapter can load as-is (used on prepared checkpoints)."""
    problems = [
        f"config.json lacks {f!r} (required by MiMoV2InferenceConfig)"
        for f in REQUIRED_CONFIG_FIELDS + EXTRA_CONFIG_FIELDS
        if cfg.get(f) is None
    ]
    if cfg.get("quantization_config"):
        problems.append("config.json still has quantization_config (the BF16 path needs it removed)")
    if cfg.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings is true (NxDI's MiMo adapter crashes with tied embeddings)")
    if cfg.get("torch_dtype") != "bfloat16":
        problems.append(f"torch_dtype is {cfg.get('torch_dtype')!r}, expected 'bfloat16'")
    return problems
