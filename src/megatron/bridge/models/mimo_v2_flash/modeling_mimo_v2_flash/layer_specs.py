"""Layer specs for MiMo-V2-Flash: a pure-torch local backend (CPU or GPU) and a TransformerEngine backend.

Both start from Megatron-Core's GPT specs (which already split dense / MoE layers by ``moe_layer_freq``) and
swap in the MiMo self-attention and core attention. The MTP layer is a dense SwiGLU layer whose attention is
always sliding-window (with the SWA sink setting), whatever the decoder's last layer is.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer import ModuleSpec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.attention import (
    MiMoV2FlashCoreAttention,
    MiMoV2FlashSelfAttention,
    has_attention_sink,
    layer_attention_kind,
    mark_heads_sharded,
    te_cp_comm_type,
)
from mimo_v2_flash.config import SLIDING_ATTENTION


class MiMoV2FlashRMSNorm(torch.nn.RMSNorm):
    """The local backend's RMSNorm (``torch.nn.RMSNorm``, as Megatron-Core's ``WrappedTorchNorm`` builds it),
    usable with sequence parallelism.

    With sequence parallelism each tensor-parallel rank normalizes its own slice of the tokens, so the weight's
    gradient is partial; marking it ``sequence_parallel`` makes Megatron-Core's ``finalize_model_grads`` sum it
    over the tensor-parallel group, as it does for TransformerEngine's norms. ``WrappedTorchNorm`` refuses
    sequence parallelism, which Megatron-Core requires for training MoE layers with tensor parallelism.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"MiMo-V2-Flash uses RMSNorm, not {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _with_mimo_norm(spec):
    """Replace ``WrappedTorchNorm`` everywhere in a (nested) local spec by :class:`MiMoV2FlashRMSNorm`."""
    if spec is WrappedTorchNorm:
        return MiMoV2FlashRMSNorm
    if isinstance(spec, ModuleSpec):
        spec.module = _with_mimo_norm(spec.module)
        spec.submodules = _with_mimo_norm(spec.submodules)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for field in dataclasses.fields(spec):
            setattr(spec, field.name, _with_mimo_norm(getattr(spec, field.name)))
    elif isinstance(spec, list):
        spec[:] = [_with_mimo_norm(item) for item in spec]
    return spec


def te_core_attention_class():
    """TransformerEngine core attention with MiMo's per-layer window, sink and V head dim (imported lazily)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class MiMoV2FlashTECoreAttention(TEDotProductAttention):
        """TE attention: window (W previous tokens, 0 future) and learnable sink on the layers that have them."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_kind=None, **kwargs):
            kind = layer_attention_kind(config, layer_number, attention_kind)
            config = copy.copy(config)
            config.window_size = (config.sliding_window_size, 0) if kind == SLIDING_ATTENTION else None
            config.softmax_type = "learnable" if has_attention_sink(config, kind) else "vanilla"
            kwargs.setdefault("k_channels", config.kv_channels)
            kwargs.setdefault("v_channels", config.v_head_dim)
            if config.context_parallel_size > 1:
                # By the layer's own kind: Megatron-Core indexes the per-layer list with an MTP layer's own number
                # (1, 2, ...), which names a decoder layer, not this sliding-window layer.
                kwargs["cp_comm_type"] = te_cp_comm_type(config, kind)
            super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
            sink = getattr(self, "softmax_offset", None)
            if isinstance(sink, torch.nn.Parameter):
                # TransformerEngine 2.8-2.10 creates the learnable offset with torch.empty and leaves it so.
                if config.perform_initialization:
                    with torch.no_grad():
                        config.init_method(sink)
                mark_heads_sharded(sink)

    return MiMoV2FlashTECoreAttention


def _use_mimo_attention(layer_spec: ModuleSpec, use_te: bool, attention_kind: str | None = None) -> None:
    attention = layer_spec.submodules.self_attention
    attention.module = MiMoV2FlashSelfAttention
    core = te_core_attention_class() if use_te else MiMoV2FlashCoreAttention
    if attention_kind is not None:
        attention.params = dict(attention.params, attention_kind=attention_kind)
        core = functools.partial(core, attention_kind=attention_kind)
    attention.submodules.core_attention = core


def _te_checkpoint_keys(layer_spec: ModuleSpec) -> None:
    """Make a local layer's checkpoint keys those of the TransformerEngine spec.

    ``get_gpt_layer_local_spec`` maps ``pre_mlp_layernorm.`` to ``mlp.linear_fc1.layer_norm_`` on every layer;
    the TE spec fuses that norm into ``linear_fc1`` only in dense layers and keeps ``pre_mlp_layernorm.weight``
    in MoE layers (whose ``mlp`` is a ``MoELayer``). Upstream Megatron-Bridge checkpoints are written with the TE
    spec, so MoE layers keep their own key here too.
    """
    keys_map = layer_spec.submodules.sharded_state_dict_keys_map
    mlp = layer_spec.submodules.mlp  # a ModuleSpec, or (Megatron-Core 0.19) a partial of the module class
    if keys_map and MoELayer in (getattr(mlp, "module", None), getattr(mlp, "func", None)):
        layer_spec.submodules.sharded_state_dict_keys_map = {
            k: v for k, v in keys_map.items() if not k.startswith("pre_mlp_layernorm.")
        }


def mimo_v2_flash_block_spec(config, vp_stage: int | None = None):
    """Decoder block spec (dense / MoE per layer) with MiMo attention, for the configured backend."""
    use_te = config.use_transformer_engine
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
    )
    for layer_spec in spec.layer_specs:
        _use_mimo_attention(layer_spec, use_te)
        if not use_te:
            _te_checkpoint_keys(layer_spec)
    return spec if use_te else _with_mimo_norm(spec)


def mimo_v2_flash_mtp_block_spec(config, vp_stage: int | None = None):
    """MTP block spec: ``config.mtp_num_layers`` dense SWA layers, or None without MTP."""
    if not config.mtp_num_layers:
        return None
    use_te = config.use_transformer_engine
    if use_te:
        layer_spec = get_gpt_layer_with_transformer_engine_spec(num_experts=None, moe_grouped_gemm=False)
    else:
        layer_spec = get_gpt_layer_local_spec(num_experts=None, moe_grouped_gemm=False, normalization="RMSNorm")
    _use_mimo_attention(layer_spec, use_te, attention_kind=SLIDING_ATTENTION)
    spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te, vp_stage=vp_stage)
    return spec if use_te else _with_mimo_norm(spec)
