"""Nothing is lost in ``prepare``: tensor by tensor under the rename map, and through a plain-torch forward."""

from __future__ import annotations

import json

import pytest
import torch
from ne_helpers import config, dequantized, load_weights
from ne_reference import logits

from mimo_v2_flash.checkpoint import hf_checkpoint

PREPARED_BIAS = "model.layers.{i}.mlp.router.e_score_correction_bias"  # what NxDI loads (written independently here)
HUB_BIAS = "mlp.gate.e_score_correction_bias"
IDS = torch.tensor([5, 17, 99, 3, 250, 41, 7, 7, 120, 64, 33, 301, 2, 88, 190, 11, 45, 230])  # >= 3x the window


def expected_prepared(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16(source) under the rename (router bias fp32 and renamed, MTP dropped)."""
    out = {}
    for name, tensor in source.items():
        if name.startswith("model.mtp."):
            continue
        if name.endswith(HUB_BIAS):
            out[name.replace(HUB_BIAS, "mlp.router.e_score_correction_bias")] = tensor.float()
        else:
            out[name] = tensor.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("source_key, prepared_key", [("source", "prepared"), ("fp8", "prepared_fp8")])
def test_every_prepared_tensor_is_bf16_of_its_source(ne_checkpoints, source_key, prepared_key):
    expected = expected_prepared(dequantized(ne_checkpoints[source_key]))
    prepared = load_weights(ne_checkpoints[prepared_key])
    assert sorted(prepared) == sorted(expected)
    for name, tensor in expected.items():
        assert prepared[name].dtype == tensor.dtype and torch.equal(prepared[name], tensor), name
    assert any(n.endswith("self_attn.attention_sink_bias") for n in prepared)  # sinks kept
    assert any(".mlp.experts.3.down_proj.weight" in n for n in prepared)  # experts separate


def test_kv_heads_not_replicated(ne_checkpoints):
    cfg, prepared = config(ne_checkpoints["source"]), load_weights(ne_checkpoints["prepared"])
    for i, kind in enumerate(cfg["hybrid_layer_pattern"]):
        kv = cfg["swa_num_key_value_heads"] if kind else cfg["num_key_value_heads"]
        assert prepared[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] == kv * cfg["head_dim"]
        assert prepared[f"model.layers.{i}.self_attn.v_proj.weight"].shape[0] == kv * cfg["v_head_dim"]


def test_mtp_written_apart_with_keep_mtp(ne_checkpoints):
    mtp_dir = ne_checkpoints["prepared_fp8"] / "mtp"
    source = dequantized(ne_checkpoints["fp8"])
    mtp = load_weights(mtp_dir)
    assert sorted(mtp) == sorted(n for n in source if n.startswith("model.mtp."))
    for name, tensor in mtp.items():
        assert torch.equal(tensor, source[name].to(torch.bfloat16)), name
    assert not (ne_checkpoints["prepared"] / "mtp").exists()
    index = json.loads((mtp_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in mtp_dir.glob("*.safetensors")}


def test_reference_forward_matches_transformers(ne_checkpoints):
    """The oracle itself: plain-torch forward == transformers' native MiMoV2FlashForCausalLM (fp32)."""
    from mimo_testing import hf_logits

    source = ne_checkpoints["source"]
    ours = logits(load_weights(source), config(source), IDS)
    theirs = hf_logits(source, IDS[None])[0]
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("source_key, prepared_key", [("source", "prepared"), ("fp8", "prepared_fp8")])
def test_prepared_logits_equal_source_logits(ne_checkpoints, source_key, prepared_key):
    source_weights = {k: v.to(torch.bfloat16) for k, v in dequantized(ne_checkpoints[source_key]).items()}
    reference = logits(source_weights, config(ne_checkpoints[source_key]), IDS)
    prepared = load_weights(ne_checkpoints[prepared_key])
    ours = logits(prepared, config(ne_checkpoints[prepared_key]), IDS, router_bias=PREPARED_BIAS)
    assert (ours - reference).abs().max() <= 1e-4
    # The comparison can fail: the router bias and the sinks each change the logits.
    no_bias = {k: (torch.zeros_like(v) if "e_score_correction_bias" in k else v) for k, v in prepared.items()}
    assert (
        logits(no_bias, config(ne_checkpoints[prepared_key]), IDS, router_bias=PREPARED_BIAS) - reference
    ).abs().max() > 1e-3
    no_sinks = {k: v for k, v in prepared.items() if not k.endswith("attention_sink_bias")}
    with pytest.raises(KeyError, match="attention_sink_bias"):
        logits(no_sinks, config(ne_checkpoints[prepared_key]), IDS, router_bias=PREPARED_BIAS)


def test_output_shards_are_bounded(ne_checkpoints):
    """prepared_fp8 was written with max_shard_bytes=100_000: no shard holds more (streaming, shard by shard)."""
    hf = hf_checkpoint.HFCheckpoint(ne_checkpoints["prepared_fp8"])
    per_shard: dict[str, int] = {}
    for name in hf.keys():
        per_shard[hf.weight_map[name]] = per_shard.get(hf.weight_map[name], 0) + hf.nbytes(name)
    assert len(per_shard) > 3 and max(per_shard.values()) <= 100_000
