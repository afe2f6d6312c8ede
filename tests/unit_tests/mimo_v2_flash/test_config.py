"""Config reading: hub and transformers-native spellings, window semantics, clear errors naming the field."""

from __future__ import annotations

import pytest

from mimo_v2_flash.config import (
    MiMoV2FlashConfigError,
    parse_architecture,
    with_native_fields,
)
from mimo_v2_flash.tiny_checkpoint import tiny_config

HUB_ONLY = tiny_config(
    hybrid_layer_pattern=[1, 0, 0, 1], moe_layer_freq=[1, 0, 1, 1], rope_theta=123.0, swa_rope_theta=7.0
)


def _native_only(cfg):
    native = with_native_fields(cfg)
    for hub_field in (
        "hybrid_layer_pattern",
        "moe_layer_freq",
        "sliding_window_size",
        "rope_theta",
        "swa_rope_theta",
        "partial_rotary_factor",
        "layernorm_epsilon",
        "swa_num_key_value_heads",
    ):
        native.pop(hub_field)
    return native


def test_hub_and_native_spellings_give_the_same_architecture():
    assert parse_architecture(HUB_ONLY) == parse_architecture(_native_only(HUB_ONLY))


def test_hub_fields_are_read_not_defaults():
    arch = parse_architecture(HUB_ONLY)
    assert arch.layer_types == ("sliding_attention", "full_attention", "full_attention", "sliding_attention")
    assert arch.moe_layers == (True, False, True, True)
    assert (arch.full_rope_theta, arch.swa_rope_theta) == (123.0, 7.0)


def test_transformers_native_config_class_ignores_hub_fields():
    """Why we read config.json ourselves: the native class fills its own defaults (facts file trap)."""
    from transformers import MiMoV2FlashConfig

    native = MiMoV2FlashConfig(**{k: v for k, v in HUB_ONLY.items() if k != "torch_dtype"})
    assert native.layer_types[0] == "full_attention"  # default pattern, not hybrid_layer_pattern[0] == 1
    assert parse_architecture(HUB_ONLY).layer_types[0] == "sliding_attention"


def test_window_semantics_previous_tokens():
    assert parse_architecture(tiny_config(sliding_window_size=128)).sliding_window_size == 128
    native = _native_only(tiny_config(sliding_window_size=128))
    assert native["sliding_window"] == 129
    assert parse_architecture(native).sliding_window_size == 128


@pytest.mark.parametrize(
    "override, field",
    [
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"n_group": 2}, "n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "default", "type": "linear"}}, "rope_scaling"),
        ({"rope_scaling": "default"}, "rope_scaling"),
        ({"attention_projection_layout": "interleaved"}, "attention_projection_layout"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"n_shared_experts": 1}, "n_shared_experts"),
        ({"hybrid_layer_pattern": [0, 1, 2, 0]}, "hybrid_layer_pattern"),
        ({"hybrid_layer_pattern": [0, 1]}, "layer pattern"),
        ({"swa_num_key_value_heads": 3}, "swa_num_key_value_heads"),
        ({"partial_rotary_factor": 0.3}, "partial_rotary_factor"),
    ],
)
def test_unsupported_values_are_clear_errors(override, field):
    with pytest.raises(MiMoV2FlashConfigError, match=field):
        parse_architecture(tiny_config(**override))


def test_family_fields_are_read():
    """MiMo-V2.5 / V2.5-Pro / V2.6-Flash spell plain RoPE as a default ``rope_scaling``, state the projection
    layout and null shared experts, and list full-attention layers irregularly."""
    family = tiny_config(
        rope_scaling={"rope_type": "default", "type": "default"},
        attention_projection_layout="fused_qkv",
        n_shared_experts=None,
        hybrid_layer_pattern=[0, 1, 0, 0],
        attention_value_scale=0.612,
        max_position_embeddings=1048576,
        layernorm_epsilon=1e-6,
    )
    arch = parse_architecture(family)
    assert arch == parse_architecture({k: v for k, v in family.items() if k != "rope_scaling"})
    assert (arch.attention_value_scale, arch.max_position_embeddings, arch.norm_eps) == (0.612, 1048576, 1e-6)
    assert arch.layer_types == ("full_attention", "sliding_attention", "full_attention", "full_attention")
    assert parse_architecture(tiny_config(rope_scaling={"type": "default"})) == parse_architecture(tiny_config())


def test_unknown_rope_type_in_native_form_is_an_error():
    native = _native_only(tiny_config())
    native.pop("rope_theta", None)
    native["rope_parameters"]["full_attention"]["rope_type"] = "dynamic"
    with pytest.raises(MiMoV2FlashConfigError, match="rope_type"):
        parse_architecture(native)


def test_missing_required_field_is_named():
    cfg = tiny_config()
    del cfg["num_attention_heads"]
    with pytest.raises(MiMoV2FlashConfigError, match="num_attention_heads"):
        parse_architecture(cfg)


def test_inconsistent_double_spelling_is_an_error():
    cfg = with_native_fields(tiny_config())
    cfg["layer_types"] = ["sliding_attention"] * len(cfg["layer_types"])
    with pytest.raises(MiMoV2FlashConfigError, match="disagree"):
        parse_architecture(cfg)


def test_written_configs_carry_every_field_the_serving_stacks_read():
    """A source config without the SWA fields (or in the native spelling only) still exports all of them."""
    import dataclasses

    import torch
    from mimo_testing import missing_serving_fields

    from mimo_v2_flash.checkpoint.hf_writer import export_config
    from mimo_v2_flash.config import released_config

    bare = {k: v for k, v in released_config().items() if not k.startswith("swa_") or k == "swa_rope_theta"}
    bare.pop("swa_num_key_value_heads", None)
    assert missing_serving_fields(bare)  # the fixture really lacks them
    for source in (bare, _native_only(HUB_ONLY), HUB_ONLY):
        written = export_config(source, torch.bfloat16)
        assert missing_serving_fields(written) == []
        arch = parse_architecture(source)
        assert written["swa_v_head_dim"] == written["v_head_dim"] == arch.v_head_dim  # not swa_head_dim
        assert (
            written["swa_head_dim"] == arch.head_dim and written["swa_num_attention_heads"] == arch.num_attention_heads
        )
        assert written["swa_num_key_value_heads"] == arch.swa_num_kv_heads
        assert dataclasses.replace(parse_architecture(written), torch_dtype=arch.torch_dtype) == arch
    assert missing_serving_fields(with_native_fields(tiny_config())) == []  # what the tiny maker writes
