"""Megatron-Bridge bridge for Xiaomi MiMo-V2-Flash (``MiMoV2FlashForCausalLM``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_mappings import mimo_v2_flash_mapping_registry
from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import MiMoV2FlashModelProvider
from mimo_v2_flash.checkpoint.fp8 import FP8_DTYPE, FP8Checkpoint
from mimo_v2_flash.checkpoint.fused_qkv import FusedQKVError, fused_chunks
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint, count_mtp_layers, read_index_metadata
from mimo_v2_flash.config import (
    FUSED_PROJECTIONS,
    SLIDING_ATTENTION,
    MiMoV2FlashArchitecture,
    apply_config_edits,
    config_edits,
    load_config_dict,
    parse_architecture,
    projection_layout,
    with_native_fields,
)


def provider_from_architecture(arch: MiMoV2FlashArchitecture, mtp_num_layers: int = 0, **overrides: Any):
    """A :class:`MiMoV2FlashModelProvider` for a normalized architecture (plus provider field overrides)."""
    params_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(arch.torch_dtype, torch.float32)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        vocab_size=arch.vocab_size,
        num_attention_heads=arch.num_attention_heads,
        kv_channels=arch.head_dim,
        v_head_dim=arch.v_head_dim,
        num_query_groups=arch.full_num_kv_heads,
        swa_num_query_groups=arch.swa_num_kv_heads,
        attention_layer_types=arch.layer_types,
        sliding_window_size=arch.sliding_window_size,
        rotary_base=arch.full_rope_theta,
        swa_rotary_base=arch.swa_rope_theta,
        rotary_percent=arch.partial_rotary_factor,
        layernorm_epsilon=arch.norm_eps,
        attention_value_scale=arch.attention_value_scale,
        full_attention_sink=arch.full_attention_sink,
        swa_attention_sink=arch.swa_attention_sink,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_moe_experts=arch.num_experts if any(arch.moe_layers) else None,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size if any(arch.moe_layers) else None,
        moe_router_topk=arch.moe_topk if any(arch.moe_layers) else 2,
        moe_router_topk_scaling_factor=arch.routed_scaling_factor if arch.routed_scaling_factor != 1.0 else None,
        moe_layer_freq=[int(v) for v in arch.moe_layers],
        mtp_num_layers=mtp_num_layers or None,
        seq_length=arch.max_position_embeddings,
        init_method_std=arch.init_method_std,
        make_vocab_size_divisible_by=1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    kwargs.update(overrides)
    return MiMoV2FlashModelProvider(**kwargs)


@MegatronModelBridge.register_bridge(
    source="MiMoV2FlashForCausalLM",
    target=GPTModel,
    provider=MiMoV2FlashModelProvider,
    model_type="mimo_v2_flash",
)
class MiMoV2FlashBridge(MegatronModelBridge):
    """HF MiMo-V2-Flash (hub or transformers-native config) <-> Megatron-Core GPT with MiMo attention."""

    fp8_dequant_dtype: torch.dtype | None = None
    """Dtype FP8 weights are dequantized to (the fp32 product cast once); None: fp32. Importing into a bf16
    model sets bf16, so no fp32 copy of a large weight is ever held (the bits are the same: one rounding)."""

    _shared_reader: FP8Checkpoint | None = None

    @classmethod
    @contextmanager
    def reading_through(cls, reader: FP8Checkpoint) -> Iterator[None]:
        """Within the block, every bridge reads ``reader``'s directory through ``reader`` (and the FP8 layouts it
        decided, e.g. under a forced ``--fp8-kv-layout``). Bridges are created anew by ``AutoBridge`` on each
        access, so the reader is shared through the class for the duration of one conversion."""
        previous, cls._shared_reader = cls._shared_reader, reader
        try:
            yield
        finally:
            cls._shared_reader = previous

    def provider_bridge(self, hf_pretrained) -> MiMoV2FlashModelProvider:
        """Provider from the checkpoint's raw ``config.json`` with the in-memory config's edits over it, and the
        checkpoint's MTP keys.

        transformers' native config class drops or refills the hub fields of a hub-form file, so the file is the
        base. What the caller changed in memory (attributes set on ``hf_pretrained.config``, keyword overrides of
        ``from_hf_pretrained``) is its difference from the same class freshly loaded from the same directory; it
        wins over the file, in either spelling, or is refused (``apply_config_edits``). Without a directory
        (``from_hf_config`` of a config built in memory) the in-memory config is all there is.
        """
        config = hf_pretrained.config
        source = getattr(hf_pretrained, "model_name_or_path", None)
        if source and (Path(source) / "config.json").is_file():
            edits, removed = config_edits(config.to_dict(), type(config).from_pretrained(source).to_dict())
            raw = apply_config_edits(load_config_dict(source), edits, removed)
        else:
            raw = config.to_dict()
        mtp_layers = 0
        state = getattr(hf_pretrained, "state", None)
        if state is not None and getattr(state, "source", None) is not None:
            mtp_layers = count_mtp_layers(state.source.get_all_keys())
        return provider_from_architecture(parse_architecture(raw), mtp_num_layers=mtp_layers)

    @classmethod
    def megatron_to_hf_config(cls, provider: MiMoV2FlashModelProvider) -> dict:
        """HF config in both spellings: hub (remote code) fields plus the transformers-native fields."""
        moe_layers = _moe_layer_list(provider)
        hub = {
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            "vocab_size": provider.vocab_size,
            "hidden_size": provider.hidden_size,
            "intermediate_size": provider.ffn_hidden_size,
            "moe_intermediate_size": provider.moe_ffn_hidden_size,
            "num_hidden_layers": provider.num_layers,
            "num_attention_heads": provider.num_attention_heads,
            "num_key_value_heads": provider.num_query_groups,
            "swa_num_attention_heads": provider.num_attention_heads,
            "swa_num_key_value_heads": provider.swa_num_query_groups,
            "head_dim": provider.kv_channels,
            "swa_head_dim": provider.kv_channels,
            "v_head_dim": provider.v_head_dim,
            "swa_v_head_dim": provider.v_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": provider.seq_length,
            "initializer_range": provider.init_method_std,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hybrid_layer_pattern": [int(t == SLIDING_ATTENTION) for t in provider.attention_layer_types],
            "moe_layer_freq": [int(v) for v in moe_layers],
            "sliding_window_size": provider.sliding_window_size,
            "rope_theta": provider.rotary_base,
            "swa_rope_theta": provider.swa_rotary_base,
            "partial_rotary_factor": provider.rotary_percent,
            "layernorm_epsilon": provider.layernorm_epsilon,
            "attention_value_scale": provider.attention_value_scale,
            "add_full_attention_sink_bias": provider.full_attention_sink,
            "add_swa_attention_sink_bias": provider.swa_attention_sink,
            "n_routed_experts": provider.num_moe_experts,
            "num_experts_per_tok": provider.moe_router_topk,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": provider.moe_router_topk_scaling_factor,
            "n_shared_experts": None,
        }
        return with_native_fields(hub)

    def maybe_modify_loaded_hf_weight(self, hf_param, hf_state_dict):
        """Read HF weights through the validating, exactly-dequantizing FP8 view of the checkpoint.

        FP8 weights come out in ``fp8_dequant_dtype`` (default fp32; the product is computed in fp32 either way);
        the mapping casts to the parameter dtype. Non-FP8 weights pass through unchanged.
        """
        reader = self._checkpoint_reader(hf_state_dict)
        if reader is None:
            weights = super().maybe_modify_loaded_hf_weight(hf_param, hf_state_dict)
            for name, tensor in zip(
                [hf_param] if isinstance(hf_param, str) else hf_param.values(),
                [weights] if isinstance(hf_param, str) else weights.values(),
                strict=True,
            ):
                if tensor.dtype == FP8_DTYPE:
                    # Its exact dequantization needs the checkpoint's scale layout, decided from the files.
                    raise CheckpointError(
                        f"{name}: FP8 weight given in memory; load the checkpoint from its directory so it is "
                        "dequantized exactly"
                    )
            return weights
        if isinstance(hf_param, str):
            return reader.get(hf_param, self._dtype_for(reader, hf_param))
        names = list(hf_param.values())
        dtypes = [self._dtype_for(reader, name) for name in names]
        return {key: reader.get(name, dtype) for key, name, dtype in zip(hf_param, names, dtypes, strict=True)}

    def _dtype_for(self, reader: FP8Checkpoint, name: str) -> torch.dtype | None:
        """FP8 weights are dequantized to ``fp8_dequant_dtype``; others come as stored."""
        return self.fp8_dequant_dtype if reader.is_quantized(name) else None

    def _checkpoint_reader(self, hf_state_dict):
        source = getattr(hf_state_dict, "source", None)
        path = getattr(source, "path", None)
        if path is None or not Path(path).is_dir():
            return None
        shared = MiMoV2FlashBridge._shared_reader
        if shared is not None and shared.checkpoint.directory.resolve() == Path(path).resolve():
            return shared
        cached = getattr(self, "_reader", None)
        if cached is None or cached.checkpoint.directory != Path(path):
            self._reader = FP8Checkpoint(HFCheckpoint(path))
        return self._reader

    def mapping_registry(self) -> MegatronMappingRegistry:
        """HF <-> Megatron parameter mappings (see ``mimo_v2_flash_mappings``): separate q/k/v, or the MiMo-V2
        family's fused ``qkv_proj`` in ``T`` chunks, ``T`` from the index's ``tp_size`` else the KV head count."""
        config = self.hf_config.to_dict() if hasattr(self.hf_config, "to_dict") else dict(self.hf_config or {})
        if not config or projection_layout(config) != FUSED_PROJECTIONS:
            return mimo_v2_flash_mapping_registry()
        directory = config.get("_name_or_path") or getattr(self.hf_config, "name_or_path", "")
        metadata = read_index_metadata(directory) if directory and Path(directory).is_dir() else {}
        try:
            return mimo_v2_flash_mapping_registry(qkv_chunks=fused_chunks(config, metadata))
        except FusedQKVError as error:
            raise CheckpointError(f"{directory or 'config'}: {error}") from None


def _moe_layer_list(provider) -> list[bool]:
    freq = provider.moe_layer_freq
    if isinstance(freq, int):
        return [provider.num_moe_experts is not None and i % freq == 0 for i in range(provider.num_layers)]
    return [bool(v) for v in freq]
