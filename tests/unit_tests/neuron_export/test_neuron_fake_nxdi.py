"""The fake NxDI adapter accepts the prepared checkpoint and rejects each way of getting it wrong."""

from __future__ import annotations

import shutil

import pytest
import torch
from ne_helpers import config, dequantized, edit_tensors
from ne_reference import greedy

from neuron_export import nxdi_contract
from neuron_export.nxdi_backend import neuron_config_kwargs


def _model(fake_nxdi, directory, tp: int = 4, fix: bool = True):
    modeling, nxdi_config, hf_adapter = fake_nxdi
    from transformers import PretrainedConfig

    if fix:
        modeling.NeuronMiMoV2ForCausalLM._apply_router_noaux_tc_fix()
    layout = {"tp": tp, "ep": tp, "moe_tp": 1, "batch_size": 2, "seq_len": 64, "logical_nc_config": 2}
    neuron_config = nxdi_config.MoENeuronConfig(**neuron_config_kwargs(layout))
    hf_config = PretrainedConfig.from_json_file(str(directory / "config.json"))
    cfg = modeling.MiMoV2InferenceConfig(
        neuron_config, load_config=hf_adapter.load_pretrained_config(hf_config=hf_config)
    )
    return modeling.NeuronMiMoV2ForCausalLM(str(directory), cfg)


def test_prepared_checkpoint_compiles_and_generates_like_the_source(fake_nxdi, ne_checkpoints, tmp_path):
    model = _model(fake_nxdi, ne_checkpoints["prepared_fp8"])
    model.compile(str(tmp_path / "compiled"))
    assert (
        sorted(p.name for p in (tmp_path / "compiled" / "weights").iterdir())[0]
        == "tp0_sharded_checkpoint.safetensors"
    )
    model.load(str(tmp_path / "compiled"))
    generated = (
        fake_nxdi[2]
        .HuggingFaceGenerationAdapter(model)
        .generate(
            input_ids=torch.tensor([[5, 17, 99, 3, 250, 41, 7]]),
            attention_mask=torch.ones(1, 7, dtype=torch.long),
            max_new_tokens=6,
        )
    )
    source = {k: v.to(torch.bfloat16) for k, v in dequantized(ne_checkpoints["fp8"]).items()}
    assert generated[0, 7:].tolist() == greedy(source, config(ne_checkpoints["fp8"]), [5, 17, 99, 3, 250, 41, 7], 6)


def test_without_the_router_fix_the_bias_would_be_dropped(fake_nxdi, ne_checkpoints):
    with pytest.raises(KeyError, match="router.e_score_correction_bias"):
        _model(fake_nxdi, ne_checkpoints["prepared"], fix=False).checked_state_dict()


def _hub_bias_name(state):
    return {nxdi_contract.hub_name(k): v for k, v in state.items()}


def _replicate_kv(state):
    return {k: (v.repeat_interleave(2, dim=0) if k.endswith(("k_proj.weight", "v_proj.weight")) else v)
            for k, v in state.items()}  # fmt: skip


def _fuse_experts(state):
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for layer in {k.split(".mlp.experts.")[0] for k in state if ".mlp.experts." in k}:
        out[layer + ".mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [
                        state[f"{layer}.mlp.experts.{e}.gate_proj.weight"],
                        state[f"{layer}.mlp.experts.{e}.up_proj.weight"],
                    ]
                )
                for e in range(4)
            ]  # fmt: skip
        )
    return out


def _float32(state):
    return {k: v.float() for k, v in state.items()}


def _drop_sinks(state):
    return {k: v for k, v in state.items() if not k.endswith("attention_sink_bias")}


def _add_mtp(state):
    return {**state, "model.mtp.layers.0.enorm.weight": torch.ones(64, dtype=torch.bfloat16)} if state else state


@pytest.mark.parametrize(
    "damage, error",
    [
        (_hub_bias_name, "mlp.gate.e_score_correction_bias"),
        (_replicate_kv, "the module expects"),
        (_fuse_experts, "missing parameters"),
        (_float32, "the BF16 path expects"),
        (_drop_sinks, "attention_sink_bias"),
        (_add_mtp, "mtp.layers.0.enorm.weight"),
    ],
)
def test_fake_rejects_wrong_layouts(fake_nxdi, ne_checkpoints, tmp_path, damage, error):
    bad = tmp_path / "bad"
    shutil.copytree(ne_checkpoints["prepared"], bad)
    edit_tensors(bad, damage)
    with pytest.raises((KeyError, ValueError, TypeError), match=error):
        _model(fake_nxdi, bad).checked_state_dict()


def test_fake_rejects_the_unprepared_checkpoints(fake_nxdi, ne_checkpoints):
    # Their config.json carries every field the adapter requires (the project writes them all everywhere), but
    # their weights are not what NxDI's BF16 path loads: fp32 (the tiny source) and FP8 (the release format).
    for key in ("source", "fp8"):
        with pytest.raises((KeyError, ValueError, TypeError), match="the BF16 path expects"):
            _model(fake_nxdi, ne_checkpoints[key]).checked_state_dict()
