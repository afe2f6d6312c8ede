"""Per-rank parameter and optimizer-state memory of MiMo-V2-Flash for a TP / PP / EP / ETP layout.

Counts come from the architecture (every tensor of the hub layout, MTP included) and Megatron's sharding:
attention, dense MLPs, embeddings and the output layer are split by TP (KV-head replication gathers at run time,
so the stored fused QKV is still split by TP); experts by EP x ETP; the router is replicated; layers are split by
PP with the embedding on the first stage and the output layer and MTP on the last. Context parallelism replicates
the parameters (the distributed optimizer shards their state over DP x CP). Activations are estimated separately
(:func:`activation_memory`), with context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo_v2_flash.config import FULL_ATTENTION, SLIDING_ATTENTION, MiMoV2FlashArchitecture

GIB = 1024**3
# Mixed-precision Adam, bytes per trainable parameter: bf16 weight 2 + fp32 grad 4 + fp32 master 4 + m 4 + v 4.
FULL_FT_BYTES = 18
FROZEN_BYTES = 2
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class RankMemory:
    """Parameters held by the most loaded rank, split by kind."""

    dense_params: float
    expert_params: float
    lora_params: float

    def full_finetune_bytes(self, dp: int, distributed_optimizer: bool, expert_dp: int | None = None) -> float:
        return sum(self.full_finetune_parts(dp, distributed_optimizer, expert_dp))

    def full_finetune_parts(
        self, dp: int, distributed_optimizer: bool, expert_dp: int | None = None
    ) -> tuple[float, float, float]:
        """(bf16 weights, fp32 gradients, optimizer state: fp32 master + Adam moments) in bytes.

        The distributed optimizer shards the optimizer state of non-expert parameters over data parallel and that
        of experts over expert data parallel (``expert_dp``, default ``dp``). Under context parallelism Megatron
        shards it over DP x CP: pass that product as ``dp``.
        """
        params = self.dense_params + self.expert_params
        if not distributed_optimizer:
            return params * 2, params * 4, params * 12
        expert_dp = dp if expert_dp is None else expert_dp
        return params * 2, params * 4, 12 * (self.dense_params / max(dp, 1) + self.expert_params / max(expert_dp, 1))

    def lora_bytes(self) -> float:
        return sum(self.lora_parts())

    def lora_parts(self) -> tuple[float, float]:
        """(frozen bf16 base weights, adapters with their gradients and optimizer state) in bytes."""
        return (self.dense_params + self.expert_params) * FROZEN_BYTES, self.lora_params * FULL_FT_BYTES


def _attention_params(arch: MiMoV2FlashArchitecture, sliding: bool, lora_rank: int) -> tuple[int, int]:
    h, heads, dk, dv = arch.hidden_size, arch.num_attention_heads, arch.head_dim, arch.v_head_dim
    kv = arch.swa_num_kv_heads if sliding else arch.full_num_kv_heads
    qkv_out = heads * dk + kv * (dk + dv)
    params = h * qkv_out + heads * dv * h + heads * int(sliding and arch.swa_attention_sink) + 2 * h
    lora = lora_rank * (h + qkv_out) + lora_rank * (heads * dv + h)
    return params, lora


def _mlp_params(hidden: int, ffn: int, lora_rank: int) -> tuple[int, int]:
    return 3 * hidden * ffn, lora_rank * (hidden + 2 * ffn) + lora_rank * (ffn + hidden)


def plan_rank_memory(
    arch: MiMoV2FlashArchitecture, tp: int, pp: int, ep: int, etp: int, mtp_layers: int, lora_rank: int = 16
) -> RankMemory:
    """Parameters on the busiest pipeline stage's rank (embedding stage or output+MTP stage)."""
    h = arch.hidden_size
    per_layer = []
    for kind, moe in zip(arch.layer_types, arch.moe_layers, strict=True):
        attn, attn_lora = _attention_params(arch, kind == SLIDING_ATTENTION, lora_rank)
        if moe:
            mlp, mlp_lora = _mlp_params(h, arch.moe_ffn_hidden_size, lora_rank)
            experts = arch.num_experts * mlp / (ep * etp)
            dense = attn / tp + arch.num_experts * (h + 1)
            lora = attn_lora / tp + arch.num_experts * mlp_lora / (ep * etp)
        else:
            mlp, mlp_lora = _mlp_params(h, arch.ffn_hidden_size, lora_rank)
            experts, dense, lora = 0.0, (attn + mlp) / tp, (attn_lora + mlp_lora) / tp
        per_layer.append((dense, experts, lora))
    per_stage = arch.num_layers // pp
    stages = [per_layer[i * per_stage : (i + 1) * per_stage] for i in range(pp)]
    totals = []
    for index, layers in enumerate(stages):
        dense = sum(layer[0] for layer in layers)
        experts = sum(layer[1] for layer in layers)
        lora = sum(layer[2] for layer in layers)
        if index == 0:
            dense += arch.vocab_size * h / tp
        if index == pp - 1:
            dense += arch.vocab_size * h / tp + h
            attn, attn_lora = _attention_params(arch, True, lora_rank)
            mlp, mlp_lora = _mlp_params(h, arch.ffn_hidden_size, lora_rank)
            dense += mtp_layers * ((attn + mlp + 2 * h * h) / tp + 3 * h)  # + enorm, hnorm, final_layernorm
            lora += mtp_layers * (attn_lora + mlp_lora) / tp
            if pp > 1 and mtp_layers:
                dense += arch.vocab_size * h / tp  # MTP needs the embedding on the last stage too
        totals.append(RankMemory(dense, experts, lora))
    return max(totals, key=lambda m: m.full_finetune_bytes(1, False))


@dataclass(frozen=True)
class ActivationMemory:
    """Activation memory of the busiest rank, in bytes.

    Attributes:
        stored: What stays from forward to backward; it scales with the tokens each rank holds,
            ``seq_length * micro_batch / (tp * cp)``.
        gathered_kv: Under context parallelism, one layer's K/V for the whole sequence, gathered from every CP
            rank, and their gradients before they are summed back (0 without CP).
    """

    stored: float
    gathered_kv: float

    @property
    def total(self) -> float:
        """Stored activations plus the gathered K/V."""
        return self.stored + self.gathered_kv


def activation_memory(
    arch: MiMoV2FlashArchitecture,
    tp: int,
    pp: int,
    seq_length: int,
    mtp_layers: int,
    micro_batch: int = 1,
    cp: int = 1,
    recompute: str = "selective",
) -> ActivationMemory:
    """Estimated activation memory of the busiest rank (the first pipeline stage) for bf16 training.

    Per transformer layer ``34 * s * b * h / t`` bytes: sequence parallelism with selective recompute of core
    attention (Korthikanti et al., 2022, no ``s^2`` term; a fused attention kernel keeps no score matrix). An MoE
    layer adds its dispatched tokens, ``k`` copies of this rank's ``s * b / t`` tokens, each keeping ``2h``
    (dispatched input, combined output) and ``2f`` (gate and up outputs; their product is recomputed) bf16
    values. The first stage of a 1F1B pipeline holds ``pp`` micro-batches in flight; the last adds the fp32 logits
    ``s * b * V / t`` (and one set per MTP layer).

    Context parallelism splits every sequence over ``cp`` ranks, so each rank holds ``s / cp`` tokens and all of
    the above falls by ``cp``. Attention needs every earlier token's K/V, though: MiMo's CP (all-gather style)
    gathers the whole sequence's K/V on every rank, on full and sliding-window layers alike (see
    :func:`gathered_kv_bytes`); core attention is recomputed, so one layer's worth is alive at a time.

    ``recompute="full"`` (Megatron's ``recompute_granularity="full"``, ``recompute_method="uniform"``,
    ``recompute_num_layers=1``, MTP layers included) keeps only each layer's input, the bf16 hidden states of the
    rank's tokens, ``2 * s * b * h / t`` bytes per layer and in-flight micro-batch, and recomputes one layer at a
    time in backward: that layer's selective estimate above (the largest layer: an MoE one where there is) is added
    once. The logits are not part of a layer and stay as above.

    Args:
        arch: The model.
        tp: Tensor-parallel size (sequence parallelism splits the stored tokens over TP too).
        pp: Pipeline-parallel size.
        seq_length: Tokens per sequence.
        mtp_layers: MTP layers (on the last stage).
        micro_batch: Sequences per micro-batch.
        cp: Context-parallel size.
        recompute: ``"selective"`` (core attention, the recipe's) or ``"full"`` (every layer, one at a time).

    Returns:
        The stored activations (under full recompute: the layer inputs and one layer's recompute working set) and
        the gathered K/V, in bytes.
    """
    tokens = seq_length * micro_batch / (tp * cp)
    h = arch.hidden_size
    per_stage = arch.num_layers // pp
    per_layer = [
        34 * tokens * h + (2 * arch.moe_topk * tokens * (2 * h + 2 * arch.moe_ffn_hidden_size) if moe else 0)
        for moe in arch.moe_layers[:per_stage]
    ]
    if recompute == "selective":
        layers, mtp, working = sum(per_layer), (34 * tokens * h) * mtp_layers, 0.0
    elif recompute == "full":
        layers, mtp = per_stage * 2 * tokens * h, 2 * tokens * h * mtp_layers
        working = max(per_layer + ([34 * tokens * h] if mtp_layers else []))
    else:
        raise ValueError(f"recompute must be 'selective' or 'full', got {recompute!r}")
    first_stage = layers * pp + working
    last_stage = layers + mtp + 4 * tokens * arch.vocab_size * (1 + mtp_layers) + working
    stored = max(first_stage, last_stage) if pp > 1 else last_stage
    gathered = gathered_kv_bytes(arch, tp, seq_length, micro_batch) if cp > 1 else 0.0
    return ActivationMemory(stored, gathered)


def activation_bytes(
    arch: MiMoV2FlashArchitecture,
    tp: int,
    pp: int,
    seq_length: int,
    mtp_layers: int,
    micro_batch: int = 1,
    cp: int = 1,
    recompute: str = "selective",
) -> float:
    """Total of :func:`activation_memory` in bytes (stored activations plus, under CP, the gathered K/V)."""
    return activation_memory(arch, tp, pp, seq_length, mtp_layers, micro_batch, cp, recompute).total


def kv_heads_per_rank(arch: MiMoV2FlashArchitecture, tp: int) -> dict[str, int]:
    """KV heads each TP rank keeps, per layer kind (one when TP exceeds the heads: they are replicated)."""
    kinds = {SLIDING_ATTENTION: arch.swa_num_kv_heads, FULL_ATTENTION: arch.full_num_kv_heads}
    return {kind: max(heads // tp, 1) for kind, heads in kinds.items() if kind in arch.layer_types}


def gathered_kv_bytes(arch: MiMoV2FlashArchitecture, tp: int, seq_length: int, micro_batch: int = 1) -> float:
    """One layer's whole-sequence K/V on a context-parallel rank, and their gradients, in bytes.

    ``2 * s * b * g * (d_k + d_v) * 2``: bf16 K and V of all ``s`` tokens for this rank's ``g`` KV heads
    (:func:`kv_heads_per_rank`), kept while the layer's attention runs, and their gradients of the same size
    before the reduce-scatter sums them back. The layer kind with the most KV heads per rank sets it. This is what
    an all-gather CP holds whatever ``cp`` is; a ring or all-to-all CP would hold less.
    """
    heads = max(kv_heads_per_rank(arch, tp).values())
    return 2 * seq_length * micro_batch * heads * (arch.head_dim + arch.v_head_dim) * 2


def unfused_score_bytes(
    arch: MiMoV2FlashArchitecture, tp: int, cp: int, seq_length: int, micro_batch: int = 1
) -> float:
    """One layer's fp32 attention scores, ``(s / cp) * s * b * heads / tp * 4`` bytes, in bytes.

    Not part of :func:`activation_memory` (a fused kernel never holds them); the local backend's unfused
    attention does, with a few more score-sized tensors (mask, softmax), so this is a lower bound of its extra peak.
    """
    return seq_length / cp * seq_length * micro_batch * arch.num_attention_heads / tp * 4


def total_parameters(arch: MiMoV2FlashArchitecture, mtp_layers: int) -> tuple[float, float]:
    """(total parameters, parameters active per token) of the model."""
    mem = plan_rank_memory(arch, 1, 1, 1, 1, mtp_layers, lora_rank=0)
    total = mem.dense_params + mem.expert_params
    active_experts = mem.expert_params * arch.moe_topk / max(arch.num_experts, 1)
    return total, mem.dense_params + active_experts
