"""The NxDI contract: normalized config.json (checked by the fake adapter's own config class) and tensor renames."""

from __future__ import annotations

import pytest
import torch
from ne_helpers import REAL_CONFIG, config

from mimo_v2_flash import config as mimo_config
from mimo_v2_flash.checkpoint import hf_checkpoint
from neuron_export import nxdi_contract


def _adapter_config(fake_nxdi, cfg: dict, tp: int = 4):
    modeling, nxdi_config, hf_adapter = fake_nxdi
    from transformers import PretrainedConfig

    neuron_config = nxdi_config.MoENeuronConfig(
        tp_degree=tp, moe_tp_degree=1, moe_ep_degree=tp, torch_dtype="bfloat16"
    )
    hf_config = PretrainedConfig(**cfg)
    return modeling.MiMoV2InferenceConfig(
        neuron_config, load_config=hf_adapter.load_pretrained_config(hf_config=hf_config)
    )


def test_released_config_lacks_adapter_fields_and_normalized_one_loads(fake_nxdi):
    with pytest.raises(AssertionError, match=r"Config must define \['swa_head_dim', 'swa_num_attention_heads'"):
        _adapter_config(fake_nxdi, REAL_CONFIG, tp=64)
    loaded = _adapter_config(fake_nxdi, nxdi_contract.nxdi_config(REAL_CONFIG), tp=64)
    assert loaded.layer_attention_types.count("full") == 9 and loaded.layer_uses_moe == [False] + [True] * 47
    assert loaded.intermediate_size == 2048 and loaded.dense_intermediate_size == 16384


@pytest.mark.parametrize("field", nxdi_contract.REQUIRED_CONFIG_FIELDS)
def test_fake_adapter_config_refuses_each_missing_field(fake_nxdi, field):
    cfg = nxdi_contract.nxdi_config(REAL_CONFIG)
    del cfg[field]
    with pytest.raises(AssertionError, match=f"Config must define \\['{field}'\\]"):
        _adapter_config(fake_nxdi, cfg, tp=64)


def test_our_required_list_matches_the_adapter(fake_nxdi):
    assert sorted(nxdi_contract.REQUIRED_CONFIG_FIELDS) == sorted(fake_nxdi[0].REQUIRED_ATTRIBUTES)


def test_normalized_config_values():
    cfg = nxdi_contract.nxdi_config(REAL_CONFIG)
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16" and "dtype" not in cfg
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert cfg["dense_intermediate_size"] == REAL_CONFIG["intermediate_size"] == 16384
    assert (cfg["swa_head_dim"], cfg["swa_v_head_dim"], cfg["swa_num_attention_heads"]) == (192, 128, 64)
    assert (cfg["num_key_value_heads"], cfg["swa_num_key_value_heads"]) == (4, 8)
    # NxDI's SWA mask keeps `sliding_window` keys including the query: window 128 previous tokens -> 129.
    assert cfg["sliding_window"] == 129 and cfg["sliding_window_size"] == 128
    assert cfg["attention_value_scale"] == 0.707 and cfg["add_swa_attention_sink_bias"] is True
    assert cfg["hybrid_layer_pattern"] == REAL_CONFIG["hybrid_layer_pattern"]
    assert nxdi_contract.config_problems(cfg) == []


def test_native_only_config_is_normalized_too():
    native = mimo_config.with_native_fields(dict(REAL_CONFIG))
    for hub_field in ("hybrid_layer_pattern", "moe_layer_freq", "rope_theta", "swa_rope_theta", "sliding_window_size",
                      "layernorm_epsilon", "swa_num_key_value_heads", "attention_value_scale"):  # fmt: skip
        native.pop(hub_field)
    cfg = nxdi_contract.nxdi_config(native)
    assert cfg["hybrid_layer_pattern"] == REAL_CONFIG["hybrid_layer_pattern"] and cfg["rope_theta"] == 5e6
    assert cfg["swa_rope_theta"] == 1e4 and cfg["sliding_window"] == 129 and cfg["swa_num_key_value_heads"] == 8
    assert cfg["attention_value_scale"] == 1.0  # absent -> no value scale; the adapter must not see null


def test_prepared_config_on_disk(ne_checkpoints):
    cfg = config(ne_checkpoints["prepared_fp8"])
    assert nxdi_contract.config_problems(cfg) == []
    assert "quantization_config" in config(ne_checkpoints["fp8"]) and "quantization_config" not in cfg


def test_renames():
    bias = "model.layers.3.mlp.gate.e_score_correction_bias"
    assert nxdi_contract.prepared_name(bias) == "model.layers.3.mlp.router.e_score_correction_bias"
    assert nxdi_contract.hub_name(nxdi_contract.prepared_name(bias)) == bias
    for unchanged in ("model.layers.3.mlp.gate.weight", "model.layers.1.self_attn.attention_sink_bias",
                      "model.layers.2.mlp.experts.7.up_proj.weight", "lm_head.weight"):  # fmt: skip
        assert nxdi_contract.prepared_name(unchanged) == unchanged
    assert nxdi_contract.output_dtype_name("model.layers.3.mlp.router.e_score_correction_bias") == "float32"
    assert nxdi_contract.output_dtype_name("model.layers.1.self_attn.attention_sink_bias") == "bfloat16"
    assert nxdi_contract.is_mtp("model.mtp.layers.0.eh_proj.weight") and not nxdi_contract.is_mtp("model.norm.weight")


def test_adapter_limits_are_problems():
    arch = mimo_config.parse_architecture(dict(REAL_CONFIG, routed_scaling_factor=2.5))
    assert any("routed_scaling_factor" in p for p in nxdi_contract.unsupported_by_adapter(arch))
    assert nxdi_contract.identity_problem({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert nxdi_contract.identity_problem(REAL_CONFIG) is None
    assert nxdi_contract.config_problems(dict(nxdi_contract.nxdi_config(REAL_CONFIG), tie_word_embeddings=True))


def test_prepared_dtypes(ne_checkpoints):
    hf = hf_checkpoint.HFCheckpoint(ne_checkpoints["prepared_fp8"])
    for name in hf.keys():
        expected = torch.float32 if name.endswith("router.e_score_correction_bias") else torch.bfloat16
        assert hf.dtype(name) == expected, name
