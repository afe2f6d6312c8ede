"""The released FP8 format in every K/V scale layout, end to end: a tiny checkpoint with the real head dims
(Q/K 192, V 128; full layers with fewer KV heads than SWA layers; an MTP layer) quantized by the tests' reference
quantizer, imported and exported by the command lines, compared with the reference dequantization."""

from __future__ import annotations

import json
from pathlib import Path

import fp8_reference
import pytest
import torch
from mimo_testing import hf_logits, hf_state_dict, missing_serving_fields
from safetensors.torch import save_file

from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
from mimo_v2_flash.conversion.cli import main as convert_main
from mimo_v2_flash.tiny_checkpoint import (
    is_fp8_quantized_in_release,
    tiny_config,
    write_tiny_checkpoint,
)

BLOCK = (128, 16)  # 128-row blocks as released; narrow column blocks give the data many blocks to decide on
convert = convert_main


def layer_layout(name: str, layout: str) -> str:
    """``mixed``: layers alternate fused_kv_split / per_rank:2 and the MTP layer is on the plain grid."""
    if layout != "mixed":
        return layout
    if ".mtp." in name:
        return "grid"
    return ("fused_kv_split", "per_rank:2")[int(name.split(".")[2]) % 2]


def write_released_format(source: Path, target: Path, layout: str) -> dict[str, torch.Tensor]:
    """FP8 copy of ``source`` in the release's format; returns the reference dequantization (bf16 / fp32)."""
    ckpt = HFCheckpoint(source)
    config = ckpt.config
    target.mkdir(parents=True)
    tensors, expected = {}, {}
    for name in ckpt.keys():
        weight = ckpt.get(name).float()
        if name.endswith("self_attn.k_proj.weight"):
            v_name = name.replace("k_proj", "v_proj")
            heads = weight.shape[0] // config["head_dim"]
            quantized = fp8_reference.quantize(
                weight, ckpt.get(v_name).float(), heads, BLOCK, layer_layout(name, layout)
            )
            tensors.update(
                dict(zip([name, name + "_scale_inv", v_name, v_name + "_scale_inv"], quantized, strict=True))
            )
            k, v = fp8_reference.dequantize(*quantized, heads, BLOCK, layer_layout(name, layout))
            expected.update({name: k.bfloat16(), v_name: v.bfloat16()})
        elif name.endswith("self_attn.v_proj.weight"):
            continue
        elif is_fp8_quantized_in_release(name):
            q, s = fp8_reference.quantize_grid(weight, BLOCK)
            tensors.update({name: q, name + "_scale_inv": s})
            expected[name] = fp8_reference.dequantize_grid(q, s, BLOCK).bfloat16()
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = expected[name] = weight
        else:
            tensors[name] = expected[name] = weight.bfloat16()
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(target / "model.safetensors"))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    (target / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16", quantization_config=quant)))
    for extra in source.glob("tokenizer*"):
        (target / extra.name).write_bytes(extra.read_bytes())
    return expected


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    cfg = tiny_config(hidden_size=128, head_dim=192, v_head_dim=128, num_key_value_heads=2, swa_num_key_value_heads=4)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "hf", cfg, mtp_layers=1, seed=21)


@pytest.mark.parametrize("layout", [*fp8_reference.LAYOUTS, "mixed"])
def test_every_layout_imports_exactly_and_transformers_agrees(layout, base, tmp_path, capsys, parallel_state):
    fp8_dir = tmp_path / "fp8"
    expected = write_released_format(base, fp8_dir, layout)
    megatron, export = tmp_path / "megatron", tmp_path / "export"
    assert convert(["import", "--hf-model", str(fp8_dir), "--megatron-path", str(megatron)]) == 0
    summary = capsys.readouterr().out
    kv_layouts = {layer_layout(n, layout) for n in expected if n.endswith("k_proj.weight")}
    assert "FP8 scale layouts:" in summary and all(kind in summary for kind in kv_layouts - {"grid"}), summary
    assert (
        convert(["export", "--hf-model", str(fp8_dir), "--megatron-path", str(megatron), "--hf-path", str(export)])
        == 0
    )
    exported = hf_state_dict(export)
    assert missing_serving_fields(json.loads((export / "config.json").read_text())) == []
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    reference = tmp_path / "reference"
    reference.mkdir()
    save_file(expected, str(reference / "model.safetensors"))
    (reference / "config.json").write_text((export / "config.json").read_text())
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8]])
    assert (hf_logits(export, ids) - hf_logits(reference, ids)).abs().max() < 1e-5


def test_inspect_fp8_reports_each_layer_kind_without_reading_experts(base, tmp_path, capsys, monkeypatch):
    fp8_dir = tmp_path / "fp8"
    write_released_format(base, fp8_dir, "mixed")
    read: list[str] = []
    original = HFCheckpoint.get
    monkeypatch.setattr(HFCheckpoint, "get", lambda self, n, *a: read.append(n) or original(self, n, *a))
    assert convert(["inspect-fp8", "--hf-model", str(fp8_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # K/V weights and scales decide the layouts; the serving report adds the q_proj scales (never a weight).
    kv_or_q_scale = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj.weight_scale_inv")
    assert read and all(any(part in n for part in kv_or_q_scale) for n in read), read
    full = next(line for line in lines if line.startswith("full.self_attn.v_proj:"))
    assert "'fused_kv_split': 1" in full and "'per_rank:2': 1" in full and "blocks with |fp8| = 448" in full
    assert next(line for line in lines if line.startswith("mtp.self_attn.k_proj:")).count("'grid': 1")
    assert any(line.startswith("experts.gate_proj:") and "'grid'" in line for line in lines)


def test_a_forced_layout_the_data_contradicts_fails_cleanly(base, tmp_path, capsys):
    fp8_dir = tmp_path / "fp8"
    write_released_format(base, fp8_dir, "fused_kv_split")
    megatron = tmp_path / "megatron"
    args = ["import", "--hf-model", str(fp8_dir), "--megatron-path", str(megatron)]
    assert convert([*args, "--fp8-kv-layout", "per_rank:2"]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("error: ") and "k_proj.weight" in error and "per_rank:2" in error and error.count("\n") == 1
    )
    assert not megatron.exists() and not list(tmp_path.glob(".*megatron*"))
    assert convert([*args, "--fp8-kv-layout", "fused_kv_split"]) == 0


def test_neuron_export_prepare_decides_the_same_way(base, tmp_path, capsys):
    from neuron_export.cli import main as neuron_export

    fp8_dir = tmp_path / "fp8"
    expected = write_released_format(base, fp8_dir, "mixed")
    out = tmp_path / "prepared"
    assert neuron_export(["prepare", "--hf-path", str(fp8_dir), "--output", str(out)]) == 0
    assert "FP8 scale layouts:" in capsys.readouterr().out
    prepared = hf_state_dict(out)
    kv = [n for n in expected if ("self_attn.k_proj" in n or "self_attn.v_proj" in n) and ".mtp." not in n]
    assert kv  # MTP layers are left out of the prepared checkpoint unless --keep-mtp
    for name in kv:
        assert torch.equal(prepared[name], expected[name]), name
    wrong = tmp_path / "wrong"
    code = neuron_export(["prepare", "--hf-path", str(fp8_dir), "--output", str(wrong), "--fp8-kv-layout", "fused_kv"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "fused_kv" in error[0] and not wrong.exists()
