"""The in-memory FP8 stream (what an RL framework pushes into an FP8 rollout engine) equals the FP8 file export."""

from __future__ import annotations

import torch
from mimo_testing import hf_state_dict, megatron_model

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_fp8_export import export_hf_weights_fp8
from mimo_v2_flash.conversion.cli import main as convert
from mimo_v2_flash.tiny_checkpoint import tiny_config, write_fp8_checkpoint, write_tiny_checkpoint


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype in (torch.float8_e4m3fn, torch.uint8) else tensor


def test_in_memory_fp8_stream_equals_the_file_export(tmp_path, parallel_state):
    from megatron.bridge import AutoBridge

    # Two KV heads on full layers, four on SWA layers: K/V blocks of both kinds, and an MTP layer.
    cfg = tiny_config(num_key_value_heads=2, swa_num_key_value_heads=4)
    fp8 = write_fp8_checkpoint(write_tiny_checkpoint(tmp_path / "hf", cfg, mtp_layers=1), tmp_path / "fp8")
    # fp32 on both routes, so the stream and the file quantize the same numbers.
    assert (
        convert(["import", "--hf-model", str(fp8), "--megatron-path", str(tmp_path / "mc"), "--dtype", "float32"]) == 0
    )
    exported = tmp_path / "out"
    command = ["export", "--hf-model", str(fp8), "--megatron-path", str(tmp_path / "mc"), "--hf-path", str(exported)]
    assert convert([*command, "--dtype", "fp8"]) == 0
    files = hf_state_dict(exported)

    bridge = AutoBridge.from_hf_pretrained(str(fp8))
    streamed = dict(export_hf_weights_fp8(bridge, megatron_model(fp8, torch.float32), fp8))

    assert sorted(streamed) == sorted(files)
    assert any(t.dtype == torch.float8_e4m3fn for t in streamed.values())
    for name, tensor in files.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape, name
        assert torch.equal(_bits(streamed[name]), _bits(tensor)), name


def test_in_memory_stream_of_a_family_model_equals_the_file_export_but_the_towers(tmp_path, parallel_state):
    """MiMo-V2.6-shaped (fused qkv_proj in 2 chunks, MXFP4 experts): the stream writes the source's own format."""
    from megatron.bridge import AutoBridge
    from mimo_v2_flash.checkpoint.validation import tower_tensors
    from mimo_v2_flash.make_tiny_checkpoint import main as make_tiny

    source = tmp_path / "v26"
    assert make_tiny(["--output", str(source), "--family", "--mxfp4"]) == 0
    megatron = ["--megatron-path", str(tmp_path / "mc")]
    assert convert(["import", "--hf-model", str(source), *megatron, "--dtype", "float32"]) == 0
    exported = tmp_path / "out"
    assert convert(["export", "--hf-model", str(source), *megatron, "--hf-path", str(exported), "--dtype", "fp8"]) == 0
    files = hf_state_dict(exported)

    bridge = AutoBridge.from_hf_pretrained(str(source))
    streamed = dict(export_hf_weights_fp8(bridge, megatron_model(source, torch.float32), source))

    assert sorted(streamed) == sorted(set(files) - set(tower_tensors(files)))
    assert any(name.endswith("qkv_proj.weight") for name in streamed)
    for name, tensor in streamed.items():
        assert tensor.dtype == files[name].dtype and torch.equal(_bits(tensor), _bits(files[name])), name
