"""plan_parallelism: parameter accounting checked against independent facts and hand-counted tiny models."""

from __future__ import annotations

import pytest

from mimo_v2_flash.checkpoint.validation import expected_tensors
from mimo_v2_flash.config import parse_architecture, released_config
from mimo_v2_flash.planning.parallel_plan import plan_rank_memory, total_parameters
from mimo_v2_flash.tiny_checkpoint import tiny_config


def _count(shapes) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def test_released_model_has_309b_parameters():
    total, active = total_parameters(parse_architecture(released_config()), mtp_layers=3)
    assert 305e9 < total < 315e9  # model card: 309B total
    assert 14e9 < active < 18e9  # model card: 15B active (plus embeddings / MTP here)
    # The card counts the main model without its MTP layers, rounded to the digits it states.
    main_total, main_active = total_parameters(parse_architecture(released_config()), mtp_layers=0)
    assert (round(main_total / 1e9), round(main_active / 1e9)) == (309, 15), (main_total, main_active)


def test_family_presets_have_their_stated_sizes():
    """Model cards: MiMo-V2.5 310B / 15B active, MiMo-V2.5-Pro 1.02T / 42B active (plus embeddings / MTP here)."""
    from mimo_v2_flash.config import released_family_configs

    configs = released_family_configs()
    v25 = total_parameters(parse_architecture(configs["MiMo-V2.5"]), mtp_layers=3)
    assert 305e9 < v25[0] < 315e9 and 14e9 < v25[1] < 18e9
    pro_arch = parse_architecture(configs["MiMo-V2.5-Pro"])
    total, active = total_parameters(pro_arch, mtp_layers=3)
    # The planner's count is every tensor the checkpoint of that config holds (listed by the validator, not it).
    assert total == _count(expected_tensors(pro_arch, 3))
    # Model card: 1.02T total, 42B active, for the main model without its MTP layers, rounded to those digits
    # (one layer more or less moves the total by 1.4%, past that rounding).
    main_total, main_active = total_parameters(pro_arch, mtp_layers=0)
    assert (round(main_total / 1e10), round(main_active / 1e9)) == (102, 42), (main_total, main_active)
    assert total > main_total and active > main_active, (total, active)
    assert (pro_arch.full_num_kv_heads, pro_arch.swa_num_kv_heads, pro_arch.layer_types.count("full_attention")) == (
        8,
        8,
        10,
    )


def test_unsharded_count_equals_every_checkpoint_tensor():
    arch = parse_architecture(tiny_config())
    mem = plan_rank_memory(arch, 1, 1, 1, 1, mtp_layers=2, lora_rank=0)
    assert mem.dense_params + mem.expert_params == _count(expected_tensors(arch, 2))


def test_sharding_divides_what_it_should():
    arch = parse_architecture(released_config())
    one = plan_rank_memory(arch, 1, 1, 1, 1, 3)
    sharded = plan_rank_memory(arch, 8, 1, 8, 1, 3)
    assert abs(sharded.expert_params - one.expert_params / 8) < 1
    assert sharded.dense_params < one.dense_params / 7  # router stays replicated
    assert sharded.lora_bytes() < sharded.full_finetune_bytes(dp=1, distributed_optimizer=False) / 5


def test_distributed_optimizer_shards_dense_state_over_dp_and_expert_state_over_expert_dp():
    from mimo_v2_flash.planning.parallel_plan import RankMemory

    mem = RankMemory(dense_params=10, expert_params=100, lora_params=0)
    assert mem.full_finetune_parts(dp=2, distributed_optimizer=True, expert_dp=4) == (
        220,
        440,
        12 * (10 / 2 + 100 / 4),
    )
    assert mem.full_finetune_parts(dp=2, distributed_optimizer=False) == (220, 440, 1320)


def test_activations_grow_with_the_tokens_each_rank_holds():
    from mimo_v2_flash.planning.parallel_plan import activation_bytes

    arch = parse_architecture(released_config())
    at_4k = activation_bytes(arch, tp=8, pp=1, seq_length=4096, mtp_layers=3)
    assert activation_bytes(arch, tp=8, pp=1, seq_length=32768, mtp_layers=3) == 8 * at_4k
    assert activation_bytes(arch, tp=4, pp=1, seq_length=4096, mtp_layers=3) == 2 * at_4k
    # 48 layers of 34 s h / t bytes at least (the dense share of Korthikanti et al.'s estimate)
    assert at_4k > 48 * 34 * 4096 / 8 * 4096


def _stored_activation_bytes(seq: int, tp: int, cp: int) -> float:
    """The documented estimate, written out for the released model at PP 1 (48 layers, the first one dense;
    h 4096, vocab 152576, top-8 of experts 2048 wide, 3 MTP layers): per layer 34 t h, MoE layers 2 k t (2h + 2f),
    the MTP layers 34 t h each, fp32 logits 4 t V for the LM head and each MTP layer; t = seq / (tp * cp)."""
    tokens = seq / (tp * cp)
    h, vocab, topk, ffn, mtp = 4096, 152576, 8, 2048, 3
    layers = 48 * 34 * tokens * h + 47 * 2 * topk * tokens * (2 * h + 2 * ffn)
    return layers + mtp * 34 * tokens * h + 4 * tokens * vocab * (1 + mtp)


def test_context_parallelism_divides_the_stored_activations_and_adds_the_whole_sequence_kv():
    from mimo_v2_flash.planning.parallel_plan import activation_bytes, activation_memory

    arch = parse_architecture(released_config())
    seq = 131072
    one = activation_memory(arch, tp=8, pp=1, seq_length=seq, mtp_layers=3)
    assert one.gathered_kv == 0 and one.stored == _stored_activation_bytes(seq, 8, 1)
    for cp in (2, 4, 8):
        split = activation_memory(arch, tp=8, pp=1, seq_length=seq, mtp_layers=3, cp=cp)
        assert split.stored == _stored_activation_bytes(seq, 8, cp) == one.stored / cp
        # TP 8 keeps one KV head per rank on both layer kinds (4 full-attention KV heads are replicated, 8 SWA
        # split); K (192) and V (128) of all 131072 tokens in bf16, and their gradients: the same for every CP.
        assert split.gathered_kv == 2 * seq * 1 * (192 + 128) * 2
        assert activation_bytes(arch, tp=8, pp=1, seq_length=seq, mtp_layers=3, cp=cp) == split.total


@pytest.mark.parametrize(("tp", "cp", "pp"), [(8, 1, 1), (2, 4, 1), (1, 8, 1), (8, 1, 4)])
def test_full_recompute_keeps_the_layer_inputs_and_one_layer_recompute(tp, cp, pp):
    """recompute_granularity=full, uniform, one layer per unit: each layer (and MTP layer) keeps its bf16 input,
    2 t h bytes, per micro-batch in flight (PP of them on the first stage), plus one MoE layer's selective set,
    34 t h + 2 k t (2h + 2f), while it is recomputed; the fp32 logits stay; with CP the gathered K/V too."""
    from mimo_v2_flash.planning.parallel_plan import activation_memory

    arch = parse_architecture(released_config())
    seq = 131072
    tokens = seq / (tp * cp)
    h, vocab, topk, ffn, mtp = 4096, 152576, 8, 2048, 3
    inputs = 48 // pp * 2 * tokens * h
    working = 34 * tokens * h + 2 * topk * tokens * (2 * h + 2 * ffn)
    last = inputs + mtp * 2 * tokens * h + 4 * tokens * vocab * (1 + mtp) + working
    expected = max(inputs * pp + working, last) if pp > 1 else last
    full = activation_memory(arch, tp=tp, pp=pp, seq_length=seq, mtp_layers=mtp, cp=cp, recompute="full")
    assert full.stored == pytest.approx(expected, rel=1e-12)
    assert full.gathered_kv == (2 * seq * max(8 // tp, 1) * (192 + 128) * 2 if cp > 1 else 0)
    selective = activation_memory(arch, tp=tp, pp=pp, seq_length=seq, mtp_layers=mtp, cp=cp)
    assert full.stored < selective.stored and full.gathered_kv == selective.gathered_kv


def test_gathered_kv_counts_the_kv_heads_each_tensor_parallel_rank_keeps():
    from mimo_v2_flash.planning.parallel_plan import gathered_kv_bytes, kv_heads_per_rank

    arch = parse_architecture(released_config())  # 4 full-attention KV heads, 8 sliding-window KV heads
    assert kv_heads_per_rank(arch, 1) == {"full_attention": 4, "sliding_attention": 8}
    assert kv_heads_per_rank(arch, 2) == {"full_attention": 2, "sliding_attention": 4}
    assert kv_heads_per_rank(arch, 8) == {"full_attention": 1, "sliding_attention": 1}
    assert gathered_kv_bytes(arch, tp=2, seq_length=1024) == 2 * 1024 * 4 * 320 * 2


def test_unfused_scores_are_a_query_block_by_the_whole_sequence_per_head():
    from mimo_v2_flash.planning.parallel_plan import unfused_score_bytes

    arch = parse_architecture(released_config())  # 64 attention heads
    assert unfused_score_bytes(arch, tp=8, cp=8, seq_length=131072) == 16384 * 131072 * 8 * 4


def test_lora_parts_are_the_frozen_base_and_the_adapters_state():
    from mimo_v2_flash.planning.parallel_plan import RankMemory

    mem = RankMemory(dense_params=10, expert_params=100, lora_params=3)
    assert mem.lora_parts() == (220, 54)
    assert mem.lora_bytes() == 274
