"""ShardWriter writes tensors straight to disk; safetensors' own reader must read the shards back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron.bridge.models.mimo_v2_flash.hf_checkpoint import CheckpointError
from megatron.bridge.models.mimo_v2_flash.hf_export import ShardWriter


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {f"layer.{i}.weight": torch.randn(64, 33, generator=generator).to(torch.bfloat16) for i in range(6)}
    out["bias_fp32"] = torch.randn(7, generator=generator)
    out["big"] = torch.randn(300, 100, generator=generator)  # larger than a shard on its own
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 4)
    out["mask"] = torch.tensor([True, False, True])
    out["transposed"] = torch.randn(5, 9, generator=generator).t()  # not contiguous
    return out


@pytest.mark.parametrize("reserve", [256 * 1024, 300])
def test_shards_read_back_exactly(tmp_path, reserve):
    writer = ShardWriter(tmp_path, max_shard_bytes=10_000, header_reserve=reserve)
    source = tensors()
    for name, tensor in source.items():
        writer.add(name, tensor)
    weight_map = writer.finish()
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2 and not list(tmp_path.glob("*.tmp"))
    read = {}
    for shard in shards:
        read.update(load_file(str(tmp_path / shard)))
        data_bytes = sum(t.numel() * t.element_size() for n, t in source.items() if weight_map[n] == shard)
        assert (tmp_path / shard).stat().st_size == 8 + reserve + data_bytes
    assert read.keys() == source.keys()
    for name, tensor in source.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())


def test_duplicate_name_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=10_000)
    writer.add("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="tensor a twice"):
        writer.add("a", torch.zeros(2))
