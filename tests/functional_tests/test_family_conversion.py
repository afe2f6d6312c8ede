"""convert_checkpoints.py on a MiMo-V2 family checkpoint (``MiMoV2ForCausalLM``, fused pre-sharded FP8 ``qkv_proj``,
vision / audio towers): the FP8 export writes the source's own format back, the BF16 export writes separate
q/k/v equal to the reference dequantization, towers pass through byte for byte, and bad family input is a
one-line error with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_reference import BLOCK, FAMILY, TOWERS, write_family_checkpoint
from mimo_testing import hf_state_dict, megatron_logits, megatron_model
from test_conversion import convert
from test_parallel import PROMPT, TOLERANCE, _logits

from mimo_v2_flash.tiny_checkpoint import write_tiny_checkpoint

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(family checkpoint, oracle split checkpoint, Megatron checkpoint imported in fp32)."""
    root = tmp_path_factory.mktemp("family")
    split = write_tiny_checkpoint(root / "split", FAMILY, mtp_layers=1, seed=8)
    write_family_checkpoint(split, root / "family", root / "oracle", chunks=2, block=BLOCK, mxfp4=True)
    megatron = root / "megatron"
    args = ["import", "--hf-model", str(root / "family"), "--megatron-path", str(megatron), "--dtype", "float32"]
    assert convert(args) == 0
    return root / "family", root / "oracle", megatron


def _export(family_dir, megatron, out, *extra):
    return convert(
        ["export", "--hf-model", str(family_dir), "--megatron-path", str(megatron), "--hf-path", str(out), *extra]
    )


def _bits(tensor):
    if tensor.dtype in (FP8, torch.uint8):
        return tensor.view(torch.uint8)
    return tensor.view(torch.int16 if tensor.itemsize == 2 else torch.int32)


def test_fp8_export_writes_the_family_source_back(family, tmp_path, parallel_state):
    family_dir, _, megatron = family
    assert _export(family_dir, megatron, tmp_path / "fp8", "--dtype", "fp8") == 0
    source, written = hf_state_dict(family_dir), hf_state_dict(tmp_path / "fp8")
    assert sorted(written) == sorted(source)
    fused = [n for n in source if n.endswith("qkv_proj.weight")]
    assert len(fused) == 5  # 4 decoder layers + 1 MTP layer, fused as in the source
    experts = [n for n in source if n.endswith("_proj.weight_scale")]
    assert len(experts) == 36 and all(written[n].dtype == torch.uint8 for n in experts)  # 3 MoE layers x 4 x 3
    for name, tensor in source.items():
        assert written[name].dtype == tensor.dtype and written[name].shape == tensor.shape, name
        if name.endswith("_scale_inv"):
            assert torch.allclose(written[name], tensor, rtol=2**-7, atol=0), name
        else:  # FP8 payloads bit for bit; fp32 weights (imported in fp32) and bf16 towers identical
            assert torch.equal(_bits(written[name]), _bits(tensor)), name
    assert json.loads((tmp_path / "fp8" / "config.json").read_text()) == json.loads(
        (family_dir / "config.json").read_text()
    )


def test_bf16_export_is_split_and_equals_the_reference_dequantization(family, tmp_path, parallel_state):
    family_dir, oracle, megatron = family
    assert _export(family_dir, megatron, tmp_path / "bf16") == 0
    truth, source, written = hf_state_dict(oracle), hf_state_dict(family_dir), hf_state_dict(tmp_path / "bf16")
    assert sorted(written) == sorted([*truth, *TOWERS])
    for name, tensor in truth.items():
        expected = tensor.float() if name.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16)
        assert torch.equal(written[name], expected), name
    for name in TOWERS:
        assert written[name].dtype == source[name].dtype and torch.equal(_bits(written[name]), _bits(source[name]))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    source_config = json.loads((family_dir / "config.json").read_text())
    assert config["attention_projection_layout"] == "split" and "quantization_config" not in config
    assert (
        config["architectures"] == ["MiMoV2ForCausalLM"] and config["vision_config"] == source_config["vision_config"]
    )


def test_split_family_checkpoint_loads_as_the_same_model(family, tmp_path, parallel_state):
    """A family checkpoint with separate q/k/v (``attention_projection_layout: "split"``, as BF16 conversions and
    this project's FP32 export write it) loads as the same model as the split MiMo-V2-Flash of its weights."""
    family_dir, oracle, megatron = family
    assert _export(family_dir, megatron, tmp_path / "fp32", "--dtype", "float32") == 0
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["attention_projection_layout"] == "split"
    ours, reference = dict(megatron_model(tmp_path / "fp32").named_parameters()), megatron_model(oracle)
    for name, param in reference.named_parameters():
        assert torch.equal(ours[name], param), name


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_loads_give_the_one_process_logits(family, tp, tmp_path, parallel_state):
    """T = 2 chunks read at TP 2 (one chunk per rank) and TP 4 (full layers' 2 KV heads replicated)."""
    ids = torch.tensor([[int(t) for t in PROMPT.split(",")]])
    single = megatron_logits(family[0], ids)[0]
    logits = _logits(tp, tmp_path / "l.safetensors", "--hf-model", family[0], "--tp", tp)
    assert (logits - single).abs().max().item() <= TOLERANCE


def test_peft_adapter_for_a_fused_base_is_refused_in_one_line(family, tmp_path, capsys, parallel_state):
    family_dir, _, megatron = family
    assert _export(family_dir, megatron, tmp_path / "out", "--adapter-path", str(tmp_path / "adapter")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fused qkv_proj" in err[0] and "--adapter-path" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()


def _set_index_tp(directory, tp_size):
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["tp_size"] = tp_size
    path.write_text(json.dumps(index))


def _set_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


BAD = {
    # Full layers: 2 chunks of 4 blocks = 8 scale rows; tp_size 1 says 7.
    "tp_size the data contradicts": (lambda d: _set_index_tp(d, 1), ["qkv_proj", "T=1", "tp_size"]),
    "tp_size cutting heads": (lambda d: _set_index_tp(d, 3), ["tp_size=3", "whole heads"]),
    "unknown projection layout": (
        lambda d: _set_config(d, attention_projection_layout="interleaved"),
        ["config.json", "attention_projection_layout='interleaved'"],
    ),
    "mxfp4 experts without the config marker": (
        lambda d: _set_config(
            d, quantization_config={"quant_method": "fp8", "weight_block_size": list(BLOCK), "store_dtype": "fp8"}
        ),
        ["mlp.experts.", "uint8", "mxfp4"],
    ),
    "MTP layers the config contradicts": (
        lambda d: _set_config(d, num_nextn_predict_layers=3),
        ["1 MTP layer(s)", "num_nextn_predict_layers=3"],
    ),
    "scaled rope": (
        lambda d: _set_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        ["config.json", "rope_scaling", "yarn"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_family_input_is_one_line_and_leaves_nothing(case, family, tmp_path, capsys, parallel_state):
    damage, fragments = BAD[case]
    bad = tmp_path / "bad"
    shutil.copytree(family[0], bad)
    damage(bad)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    assert convert(["import", "--hf-model", str(bad), "--megatron-path", str(out_parent / "megatron")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert list(out_parent.iterdir()) == []


def test_neuron_export_prepares_the_family_as_the_split_model(family, tmp_path):
    """NxDI's MiMo model reads BF16 MiMo-V2-Flash: q/k/v split out of the chunks, MXFP4 experts decoded, towers and
    MTP left out, a V2-Flash config; the source and the output both inspect without problems."""
    from neuron_export import nxdi_contract
    from neuron_export.inspection import inspect_checkpoint
    from neuron_export.prepare import prepare

    family_dir, oracle, _ = family
    assert inspect_checkpoint(family_dir).problems == []
    prepare(family_dir, tmp_path / "nxdi")
    assert inspect_checkpoint(tmp_path / "nxdi").problems == []
    prepared, truth = hf_state_dict(tmp_path / "nxdi"), hf_state_dict(oracle)
    text_model = {nxdi_contract.prepared_name(n): t for n, t in truth.items() if not n.startswith("model.mtp.")}
    assert sorted(prepared) == sorted(text_model)
    for name, tensor in text_model.items():
        expected = tensor.float() if nxdi_contract.is_router_bias(name) else tensor.to(torch.bfloat16)
        assert torch.equal(prepared[name], expected), name
    config = json.loads((tmp_path / "nxdi" / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["MiMoV2FlashForCausalLM"], "mimo_v2_flash")
    assert "auto_map" not in config and "attention_projection_layout" not in config


def _blocks_at_448(fp8: torch.Tensor, chunks: int, block: tuple[int, int]) -> bool:
    """Every (row block, column block) of every chunk, each chunk on its own grid, holds |fp8| = 448."""
    values = fp8.float().abs()
    chunk_rows = values.shape[0] // chunks
    for c in range(chunks):
        for r in range(c * chunk_rows, (c + 1) * chunk_rows, block[0]):
            for col in range(0, values.shape[1], block[1]):
                rows_end = min(r + block[0], (c + 1) * chunk_rows)
                if values[r:rows_end, col : col + block[1]].max().item() != 448.0:
                    return False
    return True


def test_fine_tuned_family_model_exports_in_its_own_format(family, tmp_path):
    from test_finetune import TRAIN_FLAGS, finetune

    family_dir = family[0]
    finetune("--hf-model", family_dir, "--output", tmp_path / "sft", "--train-iters", "2", *TRAIN_FLAGS)
    assert _export(family_dir, tmp_path / "sft", tmp_path / "fp8", "--dtype", "fp8") == 0
    source, written = hf_state_dict(family_dir), hf_state_dict(tmp_path / "fp8")
    assert sorted(written) == sorted(source)
    assert json.loads((tmp_path / "fp8" / "config.json").read_text()) == json.loads(
        (family_dir / "config.json").read_text()
    )
    fused = [n for n in source if n.endswith("qkv_proj.weight")]
    assert any(not torch.equal(_bits(written[n]), _bits(source[n])) for n in fused)  # it was trained
    assert all(written[n].dtype == FP8 and _blocks_at_448(written[n], 2, BLOCK) for n in fused)
    experts = [n for n in source if n.endswith("_proj.weight") and ".experts." in n]
    for name in experts:  # MXFP4 by the OCP rule: every block's largest code is 4 or 6
        codes = torch.stack((written[name] & 7, (written[name] >> 4) & 7), dim=-1).reshape(written[name].shape[0], -1)
        assert written[name].dtype == torch.uint8 and bool((codes.view(codes.shape[0], -1, 32).amax(-1) >= 6).all())
