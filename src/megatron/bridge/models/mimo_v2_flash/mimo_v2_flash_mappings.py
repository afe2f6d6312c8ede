"""Parameter mappings between the MiMo-V2-Flash hub checkpoint layout and Megatron-Core parameter names."""

from __future__ import annotations

import torch
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.param_mapping import AutoMapping, GatedMLPMapping, QKVMapping
from megatron.bridge.models.conversion.utils import remove_non_pickleables

from mimo_v2_flash.checkpoint.fused_qkv import split_fused_qkv

# The sink logits are one value per query head: column-parallel along dim 0, like the heads.
AutoMapping.register_module_type("MiMoV2FlashCoreAttention", "column")
AutoMapping.register_module_type("MiMoV2FlashTECoreAttention", "column")


def merge_asymmetric_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Interleave HF ``q [heads*dk, h]``, ``k [groups*dk, h]``, ``v [groups*dv, h]`` per KV group: ``[q.., k, v]``."""
    q_groups = q.reshape(num_groups, -1, q.shape[-1])
    k_groups = k.reshape(num_groups, -1, k.shape[-1])
    v_groups = v.reshape(num_groups, -1, v.shape[-1])
    return torch.cat([q_groups, k_groups, v_groups], dim=1).reshape(-1, q.shape[-1])


def split_asymmetric_qkv(
    packed: torch.Tensor, num_groups: int, num_heads: int, qk_dim: int, v_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_asymmetric_qkv`."""
    q_rows = num_heads // num_groups * qk_dim
    groups = packed.reshape(num_groups, q_rows + qk_dim + v_dim, -1)
    q, k, v = torch.split(groups, [q_rows, qk_dim, v_dim], dim=1)
    width = packed.shape[-1]
    return q.reshape(-1, width), k.reshape(-1, width), v.reshape(-1, width)


class AsymmetricQKVMapping(QKVMapping):
    """QKV mapping where V's head dim differs from Q/K's and the KV head count is the layer's own.

    The layer config attached to each ``linear_qkv`` carries that layer's ``num_query_groups`` (full vs SWA)
    and ``v_head_dim``; tensor-parallel distribution is delegated to the parent's AutoMapping.
    """

    def hf_to_megatron(self, hf_weights: dict[str, torch.Tensor], megatron_module) -> torch.Tensor:
        merged = None
        if self.tp_rank == 0:
            config = self._get_config(megatron_module)
            q, k, v = hf_weights["q"], hf_weights["k"], hf_weights["v"]
            expected = {
                "q": config.num_attention_heads * config.kv_channels,
                "k": config.num_query_groups * config.kv_channels,
                "v": config.num_query_groups * config.v_head_dim,
            }
            for name, tensor in (("q", q), ("k", k), ("v", v)):
                if tensor.shape[0] != expected[name]:
                    raise ValueError(
                        f"{self.split_names()[name]}: {tuple(tensor.shape)} has {tensor.shape[0]} rows, "
                        f"the config expects {expected[name]}"
                    )
            merged = merge_asymmetric_qkv(q, k, v, config.num_query_groups)
        return self._tp_mapping.hf_to_megatron(merged, megatron_module)

    def megatron_to_hf(self, megatron_weights, megatron_module) -> dict[str, torch.Tensor]:
        if megatron_module is None:
            config = self.broadcast_obj_from_pp_rank(None, "qkv_config")
        else:
            config = remove_non_pickleables(self._get_config(megatron_module), max_depth=3)
            config = self.broadcast_obj_from_pp_rank(config, "qkv_config")
        packed = self._tp_mapping.megatron_to_hf(megatron_weights, megatron_module)
        if not packed:
            return {}
        q, k, v = split_asymmetric_qkv(
            next(iter(packed.values())),
            config.num_query_groups,
            config.num_attention_heads,
            config.kv_channels,
            config.v_head_dim,
        )
        names = self.split_names()
        return {names["q"]: q, names["k"]: k, names["v"]: v}

    def split_names(self) -> dict[str, str]:
        """HF names the exported ``q``, ``k``, ``v`` are written under."""
        return dict(self.hf_param)


class FusedChunkQKVMapping(AsymmetricQKVMapping):
    """A pre-sharded ``qkv_proj`` of ``chunks`` rank chunks ``[Q_c; K_c; V_c]`` (the MiMo-V2 family) <-> Megatron's
    QKV. Exported as separate ``q_proj``/``k_proj``/``v_proj``, the layout every reader agrees on."""

    def __init__(self, megatron_param: str, hf_param: str, chunks: int) -> None:
        super().__init__(megatron_param, q=hf_param, k=hf_param, v=hf_param)
        self.hf_param = hf_param
        self.chunks = chunks

    def resolve(self, captures: tuple[str, ...]) -> FusedChunkQKVMapping:
        megatron_param, hf_param = self._resolve_names(captures)
        return type(self)(megatron_param, hf_param, self.chunks)

    def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module) -> torch.Tensor:
        if self.tp_rank != 0:
            return self._tp_mapping.hf_to_megatron(None, megatron_module)
        config = self._get_config(megatron_module)
        q, k, v = split_fused_qkv(
            hf_weights,
            self.chunks,
            config.num_attention_heads,
            config.num_query_groups,
            config.kv_channels,
            config.v_head_dim,
            self.hf_param,
        )
        return super().hf_to_megatron({"q": q, "k": k, "v": v}, megatron_module)

    def split_names(self) -> dict[str, str]:
        return {part: self.hf_param.replace("qkv_proj", f"{part}_proj") for part in "qkv"}


def _attention_and_mlp(megatron_prefix: str, hf_prefix: str, mlp_norm_hf: str, qkv_chunks: int | None) -> list:
    """Mappings of one transformer layer (decoder or MTP), for both the local and the TE parameter names."""
    m, h = megatron_prefix, hf_prefix
    if qkv_chunks is None:
        qkv = AsymmetricQKVMapping(
            f"{m}.self_attention.linear_qkv.weight",
            q=f"{h}.self_attn.q_proj.weight",
            k=f"{h}.self_attn.k_proj.weight",
            v=f"{h}.self_attn.v_proj.weight",
        )
    else:
        qkv = FusedChunkQKVMapping(
            f"{m}.self_attention.linear_qkv.weight", f"{h}.self_attn.qkv_proj.weight", qkv_chunks
        )
    return [
        AutoMapping(f"{m}.input_layernorm.weight", f"{h}.input_layernorm.weight"),
        AutoMapping(f"{m}.self_attention.linear_qkv.layer_norm_weight", f"{h}.input_layernorm.weight"),
        qkv,
        AutoMapping(f"{m}.self_attention.linear_proj.weight", f"{h}.self_attn.o_proj.weight"),
        AutoMapping(f"{m}.self_attention.core_attention.softmax_offset", f"{h}.self_attn.attention_sink_bias"),
        AutoMapping(f"{m}.pre_mlp_layernorm.weight", f"{h}.{mlp_norm_hf}.weight"),
        AutoMapping(f"{m}.mlp.linear_fc1.layer_norm_weight", f"{h}.{mlp_norm_hf}.weight"),
        GatedMLPMapping(f"{m}.mlp.linear_fc1.weight", gate=f"{h}.mlp.gate_proj.weight", up=f"{h}.mlp.up_proj.weight"),
        AutoMapping(f"{m}.mlp.linear_fc2.weight", f"{h}.mlp.down_proj.weight"),
    ]


def mimo_v2_flash_mapping_registry(qkv_chunks: int | None = None) -> MegatronMappingRegistry:
    """All HF <-> Megatron mappings: embeddings, decoder layers (dense and MoE), MTP layers.

    Args:
        qkv_chunks: None for separate ``q_proj``/``k_proj``/``v_proj``; for a fused ``qkv_proj`` (the MiMo-V2
            family), its chunk count ``T``.
    """
    mappings = [
        AutoMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        AutoMapping("output_layer.weight", "lm_head.weight"),
        AutoMapping("decoder.final_layernorm.weight", "model.norm.weight"),
        *_attention_and_mlp("decoder.layers.*", "model.layers.*", "post_attention_layernorm", qkv_chunks),
        AutoMapping("decoder.layers.*.mlp.router.weight", "model.layers.*.mlp.gate.weight"),
        AutoMapping("decoder.layers.*.mlp.router.expert_bias", "model.layers.*.mlp.gate.e_score_correction_bias"),
        # Experts: SequentialMLP (local backend) and TEGroupedMLP (TE backend, one weight per expert).
        GatedMLPMapping(
            "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
            gate="model.layers.*.mlp.experts.*.gate_proj.weight",
            up="model.layers.*.mlp.experts.*.up_proj.weight",
        ),
        AutoMapping(
            "decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight",
            "model.layers.*.mlp.experts.*.down_proj.weight",
        ),
        GatedMLPMapping(
            "decoder.layers.*.mlp.experts.linear_fc1.weight*",
            gate="model.layers.*.mlp.experts.*.gate_proj.weight",
            up="model.layers.*.mlp.experts.*.up_proj.weight",
        ),
        AutoMapping(
            "decoder.layers.*.mlp.experts.linear_fc2.weight*", "model.layers.*.mlp.experts.*.down_proj.weight"
        ),
        # MTP: fusion norms and projection, then one dense SWA transformer layer.
        AutoMapping("mtp.layers.*.enorm.weight", "model.mtp.layers.*.enorm.weight"),
        AutoMapping("mtp.layers.*.hnorm.weight", "model.mtp.layers.*.hnorm.weight"),
        AutoMapping("mtp.layers.*.eh_proj.weight", "model.mtp.layers.*.eh_proj.weight"),
        AutoMapping("mtp.layers.*.final_layernorm.weight", "model.mtp.layers.*.final_layernorm.weight"),
    ]
    for inner in ("transformer_layer", "mtp_model_layer"):
        mappings += _attention_and_mlp(f"mtp.layers.*.{inner}", "model.mtp.layers.*", "pre_mlp_layernorm", qkv_chunks)
    return MegatronMappingRegistry(*mappings)
