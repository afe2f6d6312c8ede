"""Safetensors headers are validated once, when the checkpoint is opened."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused_at_open(tmp_path):
    header = {"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 24]}}  # 4 x 4 bf16 needs 32 bytes
    encoded = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(24))
    expected = r"model.safetensors: tensor w has 24 bytes, its shape \(4, 4\) needs 32$"
    with pytest.raises(CheckpointError, match=expected):
        HFCheckpoint(tmp_path)


def test_tensors_read_back_exactly_also_into_a_larger_reused_buffer(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = HFCheckpoint(tmp_path)
    buffer = torch.full((100,), 7, dtype=torch.uint8)
    for name, expected in tensors.items():
        assert torch.equal(checkpoint.get(name), expected)
        assert torch.equal(checkpoint.get(name, buffer), expected)
