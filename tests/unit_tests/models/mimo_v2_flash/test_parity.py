"""Megatron MiMo-V2-Flash (local backend, CPU) vs transformers' native MiMoV2FlashForCausalLM, fp32."""

from __future__ import annotations

import pytest
import torch
from mimo_testing import edit_checkpoint, hf_logits, megatron_logits

from mimo_v2_flash.tiny_checkpoint import tiny_config, write_tiny_checkpoint

TOLERANCE = 1e-4

CONFIGS = {
    # 1 KV head on full layers, 2 on SWA; head dims 24/16; 4 experts top-2.
    "kv1_default": tiny_config(),
    # 2/4 KV heads, V dim < Q/K dim, half-rotary, SWA first, dense layer in the middle, 6 experts top-3.
    "kv2_mixed": tiny_config(
        hidden_size=48,
        num_key_value_heads=2,
        swa_num_key_value_heads=4,
        head_dim=32,
        v_head_dim=8,
        partial_rotary_factor=0.5,
        hybrid_layer_pattern=[1, 0, 1, 1, 0],
        moe_layer_freq=[0, 1, 0, 1, 1],
        num_hidden_layers=5,
        n_routed_experts=6,
        num_experts_per_tok=3,
        sliding_window_size=5,
    ),
    # V dim > Q/K dim, quarter rotary, only SWA layers, 8 experts top-4, routed scaling factor.
    "v_wider_all_swa": tiny_config(
        head_dim=16,
        v_head_dim=32,
        partial_rotary_factor=0.25,
        hybrid_layer_pattern=[1, 1, 1],
        moe_layer_freq=[0, 1, 1],
        num_hidden_layers=3,
        n_routed_experts=8,
        num_experts_per_tok=4,
        routed_scaling_factor=2.5,
        sliding_window_size=3,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path, parallel_state):
    cfg = CONFIGS[name]
    hf_dir = write_tiny_checkpoint(tmp_path / name, cfg, mtp_layers=1, seed=3, tokenizer=False)
    seq = max(3 * cfg["sliding_window_size"] + 4, 20)
    ids = torch.randint(0, cfg["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(0))
    ours, oracle = megatron_logits(hf_dir, ids), hf_logits(hf_dir, ids)
    assert ours.shape == oracle.shape
    assert (ours - oracle).abs().max().item() <= TOLERANCE


def _zero_sinks(name, tensor):
    return torch.zeros_like(tensor) if name.endswith("attention_sink_bias") else tensor


def _zero_router_bias(name, tensor):
    return torch.zeros_like(tensor) if name.endswith("e_score_correction_bias") else tensor


def _swap_rope_bases(cfg):
    cfg["rope_theta"], cfg["swa_rope_theta"] = cfg["swa_rope_theta"], cfg["rope_theta"]
    params = cfg["rope_parameters"]
    params["full_attention"], params["sliding_attention"] = params["sliding_attention"], params["full_attention"]
    return cfg


def _no_value_scale(cfg):
    cfg["attention_value_scale"] = None
    return cfg


def _wider_window(cfg):
    cfg["sliding_window_size"] += 3
    cfg["sliding_window"] += 3
    return cfg


FEATURES = {
    "sinks": dict(tensors=_zero_sinks),
    "router_bias": dict(tensors=_zero_router_bias),
    "rope_bases": dict(config=_swap_rope_bases),
    "value_scale": dict(config=_no_value_scale),
    "window": dict(config=_wider_window),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_changes_logits_and_parity_still_holds(feature, tiny_hf_dir, tmp_path, parallel_state):
    """Perturbing one feature moves the logits a lot, and both implementations move together."""
    ids = torch.randint(0, 384, (1, 24), generator=torch.Generator().manual_seed(1))
    baseline = megatron_logits(tiny_hf_dir, ids)
    edited = edit_checkpoint(tiny_hf_dir, tmp_path / feature, **FEATURES[feature])
    ours, oracle = megatron_logits(edited, ids), hf_logits(edited, ids)
    assert (ours - baseline).abs().max().item() > 100 * TOLERANCE
    assert (ours - oracle).abs().max().item() <= TOLERANCE
