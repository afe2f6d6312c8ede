"""MiMo-V2-Flash attention for Megatron-Core.

* ``MiMoV2FlashRotaryEmbedding``: partial NeoX RoPE with one base for full-attention layers and another for
  sliding-window (SWA) layers; returns both tables stacked ``[swa, full]`` and each layer picks its own.
* ``MiMoV2FlashSelfAttention``: per-layer KV heads, Q/K head dim != V head dim (fused QKV laid out per KV
  group as ``[q_1..q_r, k, v]`` with ``v`` narrower), attention value scale.
* ``MiMoV2FlashCoreAttention``: pure-torch core attention (CPU or GPU, no TransformerEngine): causal or
  sliding-window mask, optional learnable per-head sink logit, fp32 softmax.

Which kind a layer is comes from ``config.attention_layer_types`` (global layer number) or, for MTP layers,
from the ``attention_kind`` spec parameter.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_rank
from torch import Tensor

from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.context_parallel import (
    gather_sequence,
    gathered_positions,
    local_positions,
)
from mimo_v2_flash.config import SLIDING_ATTENTION
from mimo_v2_flash.planning.parallel_layout import te_context_parallel_comm_type

SWA_ROPE_INDEX, FULL_ROPE_INDEX = 0, 1


def layer_attention_kind(config, layer_number: int, attention_kind: str | None = None) -> str:
    """Attention kind of a 1-based global decoder layer, or the explicit kind given to an MTP layer."""
    if attention_kind is not None:
        return attention_kind
    return config.attention_layer_types[layer_number - 1]


def layer_config(config, kind: str):
    """A copy of ``config`` whose ``num_query_groups`` is the KV head count of ``kind`` layers."""
    config = copy.copy(config)
    config.num_query_groups = config.swa_num_query_groups if kind == SLIDING_ATTENTION else config.num_query_groups
    return config


def has_attention_sink(config, kind: str) -> bool:
    """Whether layers of ``kind`` carry the learnable sink logit."""
    return config.swa_attention_sink if kind == SLIDING_ATTENTION else config.full_attention_sink


def te_cp_comm_type(config, kind: str) -> str:
    """TransformerEngine's context-parallel communication for layers of ``kind`` (see
    :func:`~mimo_v2_flash.planning.parallel_layout.te_context_parallel_comm_type`)."""
    window = kind == SLIDING_ATTENTION and config.sliding_window_size > 0
    return te_context_parallel_comm_type(window, has_attention_sink(config, kind))


class MiMoV2FlashRotaryEmbedding(RotaryEmbedding):
    """Partial rotary embedding with separate bases for full-attention and SWA layers."""

    def __init__(self, swa_rotary_base: float, **kwargs) -> None:
        super().__init__(**kwargs)
        swa_kwargs = dict(kwargs, rotary_base=swa_rotary_base)
        self.swa_rope = RotaryEmbedding(**swa_kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        """Both tables stacked as ``[swa, full]``, each ``[seq, 1, 1, rotary_dim]``."""
        swa = self.swa_rope(max_seq_len, offset, packed_seq, cp_group)
        return torch.stack([swa, super().forward(max_seq_len, offset, packed_seq, cp_group)])


class MiMoV2FlashSelfAttention(SelfAttention):
    """Self-attention with per-layer KV heads, a V head dim different from Q/K, and the value scale."""

    def __init__(self, config, submodules, layer_number: int, *args, attention_kind: str | None = None, **kwargs):
        self.attention_kind = layer_attention_kind(config, layer_number, attention_kind)
        config = layer_config(config, self.attention_kind)
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.val_hidden_size = config.v_head_dim
        self.value_projection_size = config.v_head_dim * config.num_query_groups
        self.linear_qkv_out_dim = self.query_projection_size + self.kv_projection_size + self.value_projection_size
        # The parent sized both projections for V head dim == Q/K head dim; rebuild them at the real sizes.
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size,
            self.linear_qkv_out_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.pg_collection.tp,
        )
        self.linear_proj = submodules.linear_proj(
            config.v_head_dim * config.num_attention_heads,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.pg_collection.tp,
        )
        self.value_scale = config.attention_value_scale

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        """Split the fused projection into Q ``[s,b,np,dk]``, K ``[s,b,ng,dk]``, V ``[s,b,ng,dv]``."""
        if output_gate or not split_qkv:
            raise NotImplementedError("MiMo-V2-Flash attention has no output gate and no fused QKV-RoPE path")
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        qk_dim, v_dim = self.hidden_size_per_attention_head, self.config.v_head_dim
        num_groups = self.config.num_query_groups
        if num_groups < self.world_size:
            # Fewer KV heads than TP ranks: gather every group, keep this rank's (as in Megatron-Core).
            mixed_qkv = all_gather_last_dim_from_tensor_parallel_region(mixed_qkv, group=self.pg_collection.tp)
            group_index = get_pg_rank(self.pg_collection.tp) // (self.world_size // num_groups)
            group_width = mixed_qkv.size(-1) // num_groups
            mixed_qkv = mixed_qkv[..., group_index * group_width : (group_index + 1) * group_width]
            heads_per_group = self.config.num_attention_heads // num_groups
        else:
            heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], self.num_query_groups_per_partition, -1)
        query, key, value = torch.split(mixed_qkv, [heads_per_group * qk_dim, qk_dim, v_dim], dim=-1)
        query = query.reshape(*query.shape[:2], -1, qk_dim)
        if num_groups < self.world_size:
            # Each rank keeps its contiguous share of the group's query heads (global head order preserved).
            ranks_per_group = self.world_size // num_groups
            index = get_pg_rank(self.pg_collection.tp) % ranks_per_group
            width = heads_per_group // ranks_per_group
            query = query[:, :, index * width : (index + 1) * width]
        if self.value_scale is not None:
            value = value * self.value_scale
        return query, key, value

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        """Select this layer's RoPE table (SWA or full base) from the stacked pair."""
        if rotary_pos_emb is not None:
            index = SWA_ROPE_INDEX if self.attention_kind == SLIDING_ATTENTION else FULL_ROPE_INDEX
            rotary_pos_emb = rotary_pos_emb[index]
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class MiMoV2FlashCoreAttention(MegatronModule):
    """Pure-torch core attention: GQA, causal / sliding window, optional sink logit, V dim != Q/K dim.

    The sink is an extra softmax column per head that carries no value: it only takes probability mass.
    Parameter name and TP sharding (``softmax_offset``, dim 0) follow Megatron-Core's learnable softmax.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        attention_kind: str | None = None,
    ) -> None:
        super().__init__(config=config)
        self.attention_kind = layer_attention_kind(config, layer_number, attention_kind)
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        world_size = self.tp_group.size()
        self.num_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5
        self.window = config.sliding_window_size if self.attention_kind == SLIDING_ATTENTION else None
        self.dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is None else attention_dropout)
        if has_attention_sink(config, self.attention_kind):
            self.softmax_offset = torch.nn.Parameter(
                torch.empty(self.num_heads_per_partition, dtype=config.params_dtype, device=_init_device(config))
            )
            if config.perform_initialization:
                config.init_method(self.softmax_offset)
            mark_heads_sharded(self.softmax_offset)
        else:
            self.softmax_offset = None

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        """``query [sq,b,np,dk]``, ``key [sk,b,ng,dk]``, ``value [sk,b,ng,dv]`` -> ``[sq, b, np*dv]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences / attention bias are not supported by the local backend")
        sq, batch, num_heads, _ = query.shape
        sk = key.size(0)
        query_pos = torch.arange(sk - sq, sk, device=query.device)
        key_pos = torch.arange(sk, device=query.device)
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp > 1:
            if attention_mask is not None:
                raise NotImplementedError("an explicit attention mask is not supported under context parallelism")
            query_pos = local_positions(sq, self.cp_group.rank(), cp, query.device)
            key_pos = gathered_positions(sk, cp, query.device)
            key, value = gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)
        repeat = num_heads // key.size(2)
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, dk]
        k = key.permute(1, 2, 0, 3).repeat_interleave(repeat, dim=1)
        v = value.permute(1, 2, 0, 3).repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
        scores = scores.masked_fill(self._mask(query_pos, key_pos, attention_mask), float("-inf"))
        if self.softmax_offset is not None:
            sink = self.softmax_offset.float().view(1, -1, 1, 1).expand(batch, -1, sq, 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if self.softmax_offset is not None:
            probs = probs[..., :-1]
        probs = self.dropout(probs).to(v.dtype)
        context = torch.matmul(probs, v)  # [b, np, sq, dv]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)

    def _mask(self, query_pos: Tensor, key_pos: Tensor, attention_mask: Tensor | None) -> Tensor:
        """True where attention is forbidden: the future, beyond the window, or masked by the caller (by the
        tokens' global positions, so the same under context parallelism)."""
        query_pos, key_pos = query_pos.unsqueeze(1), key_pos.unsqueeze(0)
        forbidden = key_pos > query_pos
        if self.window is not None:
            forbidden = forbidden | (key_pos < query_pos - self.window)
        if attention_mask is not None:
            forbidden = forbidden | attention_mask.bool()
        return forbidden

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Checkpoint the sink logits sharded along heads, as Megatron-Core does for ``softmax_offset``."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"softmax_offset": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"] if metadata else None,
        )


def mark_heads_sharded(sink: torch.nn.Parameter) -> None:
    """Mark per-head sink logits as split over tensor-parallel ranks (dim 0).

    Megatron-Core counts a parameter without this mark once, on TP rank 0, when it computes the gradient norm for
    clipping (``param_is_not_tensor_parallel_duplicate``): the sinks of the other ranks' heads would be left out.
    """
    set_tensor_model_parallel_attributes(sink, is_parallel=True, dim=0, stride=1)


def _init_device(config) -> torch.device | str | None:
    """As Megatron-Core's layers: the default device with CPU initialization (honours a meta context)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return None
    return torch.cuda.current_device()
