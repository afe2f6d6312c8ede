"""Per-rank HBM (weights, KV cache), host RAM and disk for MiMo-V2-Flash under an NxDI layout.

Tensor shapes come from the project's ``expected_tensors`` (config only, MTP excluded: NxDI has none). Each
tensor is placed the way the adapter builds its module: Q/O/dense-MLP/embedding/lm_head split over TP; K/V
split over TP, first replicated to all Q heads when TP exceeds the KV heads; experts split over EP (whole experts)
and MoE TP; routers, router biases, sinks and norms replicated. Everything is BF16 on device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mimo_v2_flash.checkpoint import validation
from neuron_export.layout import INSTANCES, Layout, cache_heads_per_rank

BF16 = 2


@dataclass
class MemoryPlan:
    """Byte counts of a layout (``weights_by_part`` per rank)."""

    total_params: int
    prepared_bytes: int
    weights_per_rank: int
    weights_by_part: dict[str, int] = field(default_factory=dict)
    kv_cache_per_rank: int = 0
    cache_heads_per_rank: int = 0
    cache_head_dim: int = 0
    hbm_per_rank: int = 0
    compile_host_bytes: int = 0
    prepare_host_bytes: int = 0
    sharded_checkpoint_bytes: int = 0

    @property
    def used_per_rank(self) -> int:
        return self.weights_per_rank + self.kv_cache_per_rank

    @property
    def utilization(self) -> float:
        return self.used_per_rank / self.hbm_per_rank


def _placement(name: str, shape: tuple[int, ...], arch, layout: Layout) -> tuple[str, float]:
    """``(part, elements on one rank)`` for a hub tensor."""
    numel = math.prod(shape)
    tp = layout.tp
    if ".mlp.experts." in name:
        return "experts", numel * (arch.num_experts // layout.ep) / arch.num_experts / layout.moe_tp
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        kv = shape[0] // (arch.head_dim if name.endswith("k_proj.weight") else arch.v_head_dim)
        replicated = numel * arch.num_attention_heads // kv if tp > kv else numel
        return "attention", replicated / tp
    if name.endswith(("q_proj.weight", "o_proj.weight")):
        return "attention", numel / tp
    if name.endswith("attention_sink_bias"):
        return "norms+sinks", numel
    if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
        return "routers", numel
    if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
        return "dense MLP", numel / tp
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "embeddings+lm_head", numel / tp
    return "norms+sinks", numel


def plan_memory(arch, layout: Layout, max_shard_bytes: int = 5 * 10**9) -> MemoryPlan:
    """Byte counts for ``arch`` under ``layout`` (the layout is assumed valid: see ``layout_problems``)."""
    shapes = validation.expected_tensors(arch, 0)
    total = sum(math.prod(s) for s in shapes.values())
    parts: dict[str, float] = {}
    for name, shape in shapes.items():
        part, elements = _placement(name, shape, arch, layout)
        parts[part] = parts.get(part, 0.0) + elements * BF16
    heads = cache_heads_per_rank(arch, layout.tp)
    head_dim = max(arch.head_dim, arch.v_head_dim)  # V is padded to the Q/K head dim in the cache
    kv = arch.num_layers * 2 * layout.batch_size * layout.seq_len * heads * head_dim * BF16
    weights = int(sum(parts.values()))
    largest = max(math.prod(s) for s in shapes.values())
    first_moe = f"model.layers.{arch.moe_layers.index(True)}.mlp.experts." if any(arch.moe_layers) else "-"
    moe_layer = sum(math.prod(s) for n, s in shapes.items() if n.startswith(first_moe))
    prepared = total * BF16 + sum(math.prod(s) for n, s in shapes.items() if n.endswith("e_score_correction_bias")) * 2
    return MemoryPlan(
        total_params=total,
        prepared_bytes=prepared,
        weights_per_rank=weights,
        weights_by_part={k: int(v) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        kv_cache_per_rank=kv,
        cache_heads_per_rank=heads,
        cache_head_dim=head_dim,
        hbm_per_rank=INSTANCES[layout.instance].hbm_per_core_bytes(layout.logical_nc_config),
        # NxDI's get_state_dict holds the whole BF16 state dict on the host; its converter builds one MoE layer's
        # fused expert tensors next to the per-expert ones; sharding then materializes one rank at a time.
        compile_host_bytes=prepared + moe_layer * BF16 + weights,
        # prepare: one output shard + the fp32 product, block-scale expansion and BF16 copy of the largest tensor.
        prepare_host_bytes=max_shard_bytes + largest * (4 + 4 + 2),
        sharded_checkpoint_bytes=weights * layout.tp,
    )
