"""Bridge dispatch, provider construction and the in-memory HF <-> Megatron weight round trip."""

from __future__ import annotations

import pytest
import torch
from mimo_testing import edit_checkpoint, hf_state_dict

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_mappings import merge_asymmetric_qkv, split_asymmetric_qkv


def test_auto_bridge_dispatches_to_this_repository(tiny_hf_dir):
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.mimo_v2_flash import MiMoV2FlashBridge, MiMoV2FlashModelProvider

    bridge = AutoBridge.from_hf_pretrained(str(tiny_hf_dir))
    assert type(bridge._model_bridge) is MiMoV2FlashBridge
    provider = bridge.to_megatron_provider(load_weights=False)
    assert isinstance(provider, MiMoV2FlashModelProvider)
    assert provider.mtp_num_layers == 1
    assert provider.attention_layer_types == (
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    )
    assert (provider.kv_channels, provider.v_head_dim) == (24, 16)
    assert (provider.num_query_groups, provider.swa_num_query_groups) == (1, 2)
    assert (provider.rotary_base, provider.swa_rotary_base) == (5e6, 1e4)
    assert provider.sliding_window_size == 4


def test_megatron_to_hf_in_memory_round_trip_is_exact(tiny_hf_dir, parallel_state):
    from megatron.bridge import AutoBridge
    from mimo_v2_flash.runtime.inference import build_model, configure_provider

    bridge = AutoBridge.from_hf_pretrained(str(tiny_hf_dir))
    model = build_model(configure_provider(bridge.to_megatron_provider(load_weights=True), torch.float32))
    exported = dict(bridge.export_hf_weights([model], cpu=True, show_progress=False))
    original = hf_state_dict(tiny_hf_dir)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("groups, heads, qk, v", [(1, 4, 24, 16), (2, 4, 32, 8), (4, 8, 16, 32)])
def test_asymmetric_qkv_layout(groups, heads, qk, v):
    hidden = 12
    q = torch.randn(heads * qk, hidden)
    k = torch.randn(groups * qk, hidden)
    vv = torch.randn(groups * v, hidden)
    merged = merge_asymmetric_qkv(q, k, vv, groups)
    per_group = heads // groups * qk + qk + v
    assert merged.shape == (groups * per_group, hidden)
    # Group g holds its query heads, then its key head, then its value head (independent index arithmetic).
    for g in range(groups):
        block = merged[g * per_group : (g + 1) * per_group]
        q_rows = heads // groups * qk
        assert torch.equal(block[:q_rows], q[g * q_rows : (g + 1) * q_rows])
        assert torch.equal(block[q_rows : q_rows + qk], k[g * qk : (g + 1) * qk])
        assert torch.equal(block[q_rows + qk :], vv[g * v : (g + 1) * v])
    back = split_asymmetric_qkv(merged, groups, heads, qk, v)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, vv), strict=True))


def test_wrong_qkv_shape_names_the_tensor(tiny_hf_dir, tmp_path, parallel_state):
    from mimo_testing import megatron_model

    def shrink_k(name, tensor):
        return tensor[:-1] if name == "model.layers.1.self_attn.k_proj.weight" else tensor

    bad = edit_checkpoint(tiny_hf_dir, tmp_path / "bad", tensors=shrink_k)
    with pytest.raises(Exception, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        megatron_model(bad)


def test_te_backend_requested_without_te_is_a_clear_error(tiny_hf_dir, parallel_state):
    from megatron.bridge import AutoBridge

    provider = AutoBridge.from_hf_pretrained(str(tiny_hf_dir)).to_megatron_provider(load_weights=False)
    provider.use_transformer_engine = True
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the TE backend may legitimately be usable here")
    with pytest.raises(RuntimeError, match="TransformerEngine backend needs CUDA"):
        provider.resolve_backend()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with TransformerEngine")
def test_te_backend_matches_local_backend_on_gpu(tiny_hf_dir):  # pragma: no cover - GPU only
    pytest.importorskip("transformer_engine")
    from megatron.bridge import AutoBridge
    from mimo_v2_flash.runtime.inference import build_model, configure_provider
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

    initialize_parallel_state()
    ids = torch.randint(0, 384, (1, 24), device="cuda")
    logits = {}
    for use_te in (False, True):
        provider = AutoBridge.from_hf_pretrained(str(tiny_hf_dir)).to_megatron_provider(load_weights=True)
        provider.use_transformer_engine = use_te
        model = build_model(configure_provider(provider, torch.bfloat16))
        with torch.no_grad():
            logits[use_te] = model(ids, torch.arange(24, device="cuda").unsqueeze(0), None).float()
    assert (logits[True] - logits[False]).abs().max().item() < 5e-2


def test_megatron_to_hf_config_round_trips_the_architecture(tiny_hf_dir):
    """The bridge's config export (used by AutoBridge.save_hf_pretrained) describes the same model."""
    import json

    from megatron.bridge import AutoBridge
    from megatron.bridge.models.mimo_v2_flash import MiMoV2FlashBridge
    from mimo_v2_flash.config import parse_architecture

    original = parse_architecture(json.loads((tiny_hf_dir / "config.json").read_text()))
    provider = AutoBridge.from_hf_pretrained(str(tiny_hf_dir)).to_megatron_provider(load_weights=False)
    exported = parse_architecture(MiMoV2FlashBridge.megatron_to_hf_config(provider))
    differing = {
        field: (getattr(original, field), getattr(exported, field))
        for field in original.__dataclass_fields__
        if getattr(original, field) != getattr(exported, field)
    }
    assert set(differing) <= {"torch_dtype"}, differing


def test_fp8_weights_given_in_memory_are_refused_not_passed_through():
    """From a checkpoint directory FP8 weights are dequantized exactly; from memory their scale layout is unknown."""
    from megatron.bridge.models.mimo_v2_flash import MiMoV2FlashBridge
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError

    bridge = MiMoV2FlashBridge()
    state = {
        "a.weight": torch.ones(2, 2).to(torch.float8_e4m3fn),
        "a.weight_scale_inv": torch.ones(1, 1),
        "b.weight": torch.ones(2, 2, dtype=torch.bfloat16),
    }
    with pytest.raises(CheckpointError, match=r"^a\.weight: FP8 weight given in memory"):
        bridge.maybe_modify_loaded_hf_weight("a.weight", state)
    with pytest.raises(CheckpointError, match=r"^a\.weight: FP8"):
        bridge.maybe_modify_loaded_hf_weight({"gate": "b.weight", "up": "a.weight"}, state)
    assert torch.equal(bridge.maybe_modify_loaded_hf_weight("b.weight", state), state["b.weight"])
