"""The in-memory FP8 stream (what an RL framework pushes into an FP8 rollout engine) equals the FP8 file export."""

from __future__ import annotations

import torch
from mimo_testing import hf_state_dict, megatron_model

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_fp8_export import export_hf_weights_fp8
from mimo_v2_flash.conversion.cli import main as convert
from mimo_v2_flash.tiny_checkpoint import tiny_config, write_fp8_checkpoint, write_tiny_checkpoint


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


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
