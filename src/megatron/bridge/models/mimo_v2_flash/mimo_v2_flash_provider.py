"""Megatron-Bridge model provider for MiMo-V2-Flash."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.core.models.gpt import GPTModel as MCoreGPTModel
from megatron.core.transformer import ModuleSpec

from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.attention import (
    MiMoV2FlashRotaryEmbedding,
    te_cp_comm_type,
)
from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.layer_specs import (
    mimo_v2_flash_block_spec,
    mimo_v2_flash_mtp_block_spec,
)
from mimo_v2_flash.config import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    MiMoV2FlashConfigError,
)
from mimo_v2_flash.planning.parallel_layout import check_parallel_layout


class MiMoV2FlashGPTModel(MCoreGPTModel):
    """Megatron-Core's GPT model whose checkpoints hold the weights only, never ``_extra_state``.

    TransformerEngine modules add ``_extra_state`` entries (FP8 scaling state, empty in bf16) that the local
    backend does not have, and Megatron-Core's loader fails on any requested key a checkpoint lacks. Leaving them
    out of the sharded state dict makes one checkpoint layout for both backends: a checkpoint written on either
    loads on the other, one that carries ``_extra_state`` (upstream's) loads too (unrequested keys are skipped),
    and a missing weight still fails.
    """

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return {key: value for key, value in sharded.items() if not key.rsplit(".", 1)[-1].startswith("_extra_state")}


def transformer_engine_usable() -> bool:
    """TransformerEngine can run here: it is installed and a CUDA device is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


BACKENDS = ("auto", "te", "local")

# Features only TransformerEngine (or apex, which the local backend does not use) provides: off on the local backend.
LOCAL_BACKEND_SETTINGS = {
    "moe_grouped_gemm": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "cross_entropy_loss_fusion": False,
    "moe_permute_fusion": False,
    "persist_layer_norm": False,
    # Megatron-Core recomputes the MoE activation ("moe_act") only with grouped GEMM.
    "recompute_modules": ["core_attn"],
}


CPU_MODEL_SETTINGS = {
    # core/transformer/moe/token_dispatcher.py: the alltoall and flex dispatchers create CUDA streams / events.
    "moe_token_dispatcher_type": "allgather",
    # Megatron-Core's jit / apex fusions (bias-GeLU, bias-dropout-add, scaled masked softmax) are CUDA kernels.
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "masked_softmax_fusion": False,
    # core/tensor_parallel/layers.py allocates parameters on torch.cuda.current_device() otherwise.
    "use_cpu_initialization": True,
    # core/tensor_parallel/random.py CheckpointFunction (activation recompute) saves and restores the CUDA RNG
    # state through torch.cuda.random ("Found no NVIDIA driver").
    "recompute_granularity": None,
}
"""Model settings a host without CUDA needs (configuration, not patches; see :func:`backend_settings`)."""


GPU_MODEL_SETTINGS = {
    "moe_grouped_gemm": True,
    "moe_token_dispatcher_type": "alltoall",
    "moe_permute_fusion": True,
    "cross_entropy_loss_fusion": True,
    "cross_entropy_fusion_impl": "te",
    "bias_activation_fusion": True,
    "bias_dropout_fusion": True,
    "masked_softmax_fusion": True,
    # The fused RoPE kernel is not verified with MiMo's partial (64 of 192 dims), dual-base rotary tables.
    "apply_rope_fusion": False,
    "use_cpu_initialization": False,
}
"""Model settings of upstream's large-MoE GPU recipes (DeepSeek-V3, Qwen3-MoE) for a host with CUDA; the local
backend turns the TE-only ones off (:data:`LOCAL_BACKEND_SETTINGS`).

Training-only settings are the recipe's: gradient-accumulation fusion writes into the ``main_grad`` buffers of
Megatron's DDP wrapper (a model built without it, as for inference or a plain backward pass, fails in backward),
and selective recompute trades compute for activation memory."""


def backend_settings(backend: str = "auto") -> dict:
    """Model settings that select the backend a checkpoint is built with *here*, whatever it was saved with.

    ``auto``: TransformerEngine where it is usable (CUDA and TE installed), the local backend otherwise; ``te`` /
    ``local`` force one. A host with CUDA starts from :data:`GPU_MODEL_SETTINGS`, the local backend turns TE-only
    features off, and a host without CUDA adds its own settings (:data:`CPU_MODEL_SETTINGS`). These are also the
    defaults of :class:`MiMoV2FlashModelProvider` (``auto``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    use_te = transformer_engine_usable() if backend == "auto" else backend == "te"
    settings: dict = {"use_transformer_engine": use_te}
    if torch.cuda.is_available():
        settings.update(GPU_MODEL_SETTINGS)
    if not use_te:
        settings.update(LOCAL_BACKEND_SETTINGS)
    if not torch.cuda.is_available():
        settings.update(CPU_MODEL_SETTINGS)
    return settings


def host_default(name: str, otherwise: Any = None) -> Any:
    """This host's value of a model setting (:func:`backend_settings` ``auto``), or ``otherwise`` where it sets
    none; a fresh copy, so no list is shared between providers or with the settings tables."""
    return copy.deepcopy(backend_settings("auto").get(name, otherwise))


def _host_field(name: str, otherwise: Any = None) -> Any:
    # Resolved when a provider is created, so a framework building it on a GPU host gets the GPU configuration and
    # one on a CPU host the CPU configuration; an explicit value (or a saved run config) wins.
    return field(default_factory=functools.partial(host_default, name, otherwise))


@dataclass
class MiMoV2FlashModelProvider(GPTModelProvider):
    """MiMo-V2-Flash: hybrid full / sliding-window attention, Q/K head dim != V head dim, sigmoid MoE, MTP.

    ``num_query_groups`` is the KV head count of full-attention layers, ``swa_num_query_groups`` that of
    sliding-window layers (and MTP layers); ``kv_channels`` is the Q/K head dim and ``v_head_dim`` the V head
    dim. A sliding-window query attends to itself and the ``sliding_window_size`` previous tokens.
    """

    transformer_layer_spec: ModuleSpec | Callable = field(default_factory=lambda: mimo_v2_flash_block_spec)
    use_transformer_engine: bool | None = None
    """TE backend (GPU) or the pure-torch local backend; None picks TE when TE and CUDA are both present."""

    attention_layer_types: tuple[str, ...] = ()
    swa_num_query_groups: int = 8
    v_head_dim: int = 128
    sliding_window_size: int = 128
    swa_rotary_base: float = 10_000.0
    attention_value_scale: float | None = None
    full_attention_sink: bool = False
    swa_attention_sink: bool = True

    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    activation_func: Callable = torch.nn.functional.silu
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_dtype: str = "fp32"
    moe_router_load_balancing_type: str = "none"
    moe_router_bias_update_rate: float = 0.0
    moe_aux_loss_coeff: float = 0.0
    moe_shared_expert_intermediate_size: int | None = None

    # This host's settings (backend_settings("auto")): the GPU configuration with CUDA and TE, the local backend
    # without TE, the CPU settings without CUDA.
    moe_grouped_gemm: bool = _host_field("moe_grouped_gemm", False)
    moe_token_dispatcher_type: str = _host_field("moe_token_dispatcher_type", "allgather")
    moe_permute_fusion: bool = _host_field("moe_permute_fusion", False)
    apply_rope_fusion: bool = _host_field("apply_rope_fusion", False)
    masked_softmax_fusion: bool = _host_field("masked_softmax_fusion", False)
    bias_activation_fusion: bool = _host_field("bias_activation_fusion", False)
    bias_dropout_fusion: bool = _host_field("bias_dropout_fusion", False)
    persist_layer_norm: bool = _host_field("persist_layer_norm", False)
    gradient_accumulation_fusion: bool = _host_field("gradient_accumulation_fusion", False)
    cross_entropy_loss_fusion: bool = _host_field("cross_entropy_loss_fusion", False)
    cross_entropy_fusion_impl: str = _host_field("cross_entropy_fusion_impl", "native")
    use_cpu_initialization: bool = _host_field("use_cpu_initialization", False)
    recompute_granularity: str | None = _host_field("recompute_granularity", None)
    recompute_modules: list[str] | None = _host_field("recompute_modules", None)

    def resolve_backend(self) -> None:
        """Fix ``use_transformer_engine``; asking for TE where it cannot run is an error. The local backend gets
        no TE-only feature (see :meth:`finalize`)."""
        usable = transformer_engine_usable()
        if self.use_transformer_engine is None:
            self.use_transformer_engine = usable
        elif self.use_transformer_engine and not usable:
            raise RuntimeError(
                "MiMo-V2-Flash: the TransformerEngine backend needs CUDA and transformer_engine "
                f"(cuda available: {torch.cuda.is_available()}, transformer_engine installed: "
                f"{importlib.util.find_spec('transformer_engine') is not None}); use_transformer_engine=False "
                "selects the pure-torch local backend"
            )
        if not self.use_transformer_engine:
            self._without_te_only_features()

    def finalize(self) -> None:
        """Upstream's finalization (the Megatron-Core config checks), for the backend chosen.

        ``use_transformer_engine=False`` alone selects a working local backend: the TE-only features that a TE
        host's defaults (or a run config written there) turn on are turned off, as :func:`backend_settings`
        ``local`` does, before the checks see them.
        """
        if self.use_transformer_engine is False:
            self._without_te_only_features()
        super().finalize()

    def _without_te_only_features(self) -> None:
        for name, value in LOCAL_BACKEND_SETTINGS.items():
            if isinstance(value, bool):
                setattr(self, name, value)
        if self.recompute_modules and "moe_act" in self.recompute_modules:
            # Megatron-Core recomputes the MoE activation only with grouped GEMM; other modules stay recomputed.
            self.recompute_modules = [m for m in self.recompute_modules if m != "moe_act"]

    def validate_mimo_layout(self) -> None:
        """Check MiMo-specific fields; every message names the offending field."""
        if len(self.attention_layer_types) != self.num_layers:
            raise MiMoV2FlashConfigError(
                f"attention_layer_types has {len(self.attention_layer_types)} entries for num_layers={self.num_layers}"
            )
        unknown = set(self.attention_layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise MiMoV2FlashConfigError(f"attention_layer_types: unknown layer type(s) {sorted(unknown)}")
        if self.sliding_window_size < 0:
            raise MiMoV2FlashConfigError(f"sliding_window_size={self.sliding_window_size} must be >= 0")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
        check_parallel_layout(
            self.architecture_view(),
            tp=self.tensor_model_parallel_size,
            pp=self.pipeline_model_parallel_size,
            ep=self.expert_model_parallel_size,
            etp=self.expert_tensor_parallel_size,
            cp=self.context_parallel_size,
            world_size=world,
            seq_length=self.seq_length if self.context_parallel_size > 1 else None,
            transformer_engine=bool(self.use_transformer_engine),
        )
        if self.num_moe_experts and self.moe_router_topk < 2:
            # Megatron-Core does not renormalize a single sigmoid score; MiMo's norm_topk_prob would give 1.0.
            raise MiMoV2FlashConfigError(f"moe_router_topk={self.moe_router_topk} must be >= 2 (norm_topk_prob)")

    def architecture_view(self) -> SimpleNamespace:
        """The sizes :func:`check_parallel_layout` needs, read from this provider."""
        freq = self.moe_layer_freq
        moe = [bool(v) for v in freq] if isinstance(freq, list) else [bool(self.num_moe_experts)] * self.num_layers
        return SimpleNamespace(
            num_attention_heads=self.num_attention_heads,
            full_num_kv_heads=self.num_query_groups,
            swa_num_kv_heads=self.swa_num_query_groups,
            vocab_size=self.vocab_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_layers=self.num_layers,
            moe_layers=moe,
            num_experts=self.num_moe_experts or 0,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size or 0,
            head_dim=self.kv_channels,
            v_head_dim=self.v_head_dim,
            layer_types=tuple(self.attention_layer_types),
            sliding_window_size=self.sliding_window_size,
            full_attention_sink=self.full_attention_sink,
            swa_attention_sink=self.swa_attention_sink,
        )

    def provide(self, pre_process=None, post_process=None, vp_stage=None) -> MCoreGPTModel:
        """Upstream's GPT model with MiMo's MTP block (dense SWA layers) and dual-base rotary embedding.

        Delegates to ``GPTModelProvider.provide`` (vocabulary padding, pipeline stages, sequence-parallel embedding
        scatter, fusion and CUDA-graph checks, the full-TE-layer groups) and swaps only what MiMo needs.
        """
        self.resolve_backend()
        self.validate_mimo_layout()
        if self.use_transformer_engine and self.context_parallel_size > 1:
            # Megatron-Core's per-layer list: a2a where TE needs it (window, sink), p2p elsewhere.
            self.cp_comm_type = [te_cp_comm_type(self, kind) for kind in self.attention_layer_types]
        with _mimo_mtp_block_spec():
            model = super().provide(pre_process, post_process, vp_stage)
        model.__class__ = MiMoV2FlashGPTModel  # adds no state: only the checkpoint's key set changes
        with torch.device("meta") if self.init_model_with_meta_device else contextlib.nullcontext():
            model.rotary_pos_emb = MiMoV2FlashRotaryEmbedding(
                swa_rotary_base=self.swa_rotary_base,
                kv_channels=self.kv_channels,
                rotary_percent=self.rotary_percent,
                rotary_interleaved=self.rotary_interleaved,
                rotary_base=self.rotary_base,
                use_cpu_initialization=self.use_cpu_initialization or not torch.cuda.is_available(),
                cp_group=self._pg_collection.cp,
            )
        return model


@contextlib.contextmanager
def _mimo_mtp_block_spec():
    """``GPTModelProvider.provide`` builds the MTP block with ``gpt_provider.mtp_block_spec`` (the last decoder
    layer's spec, always on TE); MiMo's MTP layers are dense sliding-window layers on the provider's backend, so
    that one name is MiMo's during the call."""
    from megatron.bridge.models import gpt_provider

    if not callable(getattr(gpt_provider, "mtp_block_spec", None)):
        raise RuntimeError("gpt_provider.mtp_block_spec not found (written for megatron-bridge 0.6.2)")
    upstream = gpt_provider.mtp_block_spec
    gpt_provider.mtp_block_spec = mimo_v2_flash_mtp_block_spec
    try:
        yield
    finally:
        gpt_provider.mtp_block_spec = upstream
