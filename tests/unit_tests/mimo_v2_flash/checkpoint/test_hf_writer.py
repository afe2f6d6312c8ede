"""ShardWriter writes tensors straight to disk; safetensors' own reader must read the shards back exactly."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
from mimo_v2_flash.checkpoint.hf_writer import ShardWriter, read_ahead


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


def _tracked(count: int, nbytes: int, produced: list[int], fail_at: int | None = None):
    for index in range(count):
        if index == fail_at:
            raise CheckpointError(f"bad tensor {index}")
        produced.append(index)
        yield f"t{index}", torch.zeros(nbytes, dtype=torch.uint8)


def test_read_ahead_keeps_order_and_stays_within_its_byte_budget():
    produced: list[int] = []
    seen = []
    for name, tensor in read_ahead(_tracked(40, 100, produced), max_bytes=250):
        time.sleep(0.002)  # a slow consumer: the worker runs ahead as far as the budget allows
        # produced but not yet consumed: the queue (<= 250 bytes, so 2) plus the one the worker holds
        assert len(produced) - len(seen) - 1 <= 3
        seen.append(name)
        assert tensor.numel() == 100
    assert seen == [f"t{i}" for i in range(40)]
    assert len(produced) == 40


def test_read_ahead_passes_a_single_item_larger_than_the_budget():
    assert [name for name, _ in read_ahead(_tracked(3, 1000, []), max_bytes=10)] == ["t0", "t1", "t2"]


def test_read_ahead_raises_the_workers_error_after_the_items_before_it():
    seen = []
    with pytest.raises(CheckpointError, match="bad tensor 5"):
        for name, _ in read_ahead(_tracked(10, 10, [], fail_at=5), max_bytes=1000):
            seen.append(name)
    assert seen == [f"t{i}" for i in range(5)]


def test_read_ahead_stops_the_worker_when_the_consumer_stops():
    produced: list[int] = []
    stream = read_ahead(_tracked(1000, 10, produced), max_bytes=50)
    for _ in range(3):
        next(stream)
    stream.close()  # joins the worker
    assert len(produced) < 20
    assert not any(t.name == "export-read-ahead" and t.is_alive() for t in threading.enumerate())


def test_nested_read_ahead_stops_both_workers_and_closes_the_source():
    """The FP8 export chains two read-aheads (reading, then quantizing): a consumer that stops early must stop
    both worker threads and close the source, whose clean-up (freeing a checkpoint reader) must run."""
    produced: list[int] = []
    closed = threading.Event()

    def source():
        try:
            yield from _tracked(1000, 10, produced)
        finally:
            closed.set()

    stream = read_ahead(((name, t + 1) for name, t in read_ahead(source(), max_bytes=50)), max_bytes=50)
    assert [next(stream)[0] for _ in range(3)] == ["t0", "t1", "t2"]
    stream.close()
    assert closed.is_set() and len(produced) < 40
    assert not any(t.name == "export-read-ahead" and t.is_alive() for t in threading.enumerate())
