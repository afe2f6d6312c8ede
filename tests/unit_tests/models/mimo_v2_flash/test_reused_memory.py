"""Recycled tensor memory: a storage is reused only when nothing refers to it, and what it hands out behaves like
a fresh tensor (exact storage size, no aliasing with live tensors)."""

from __future__ import annotations

import gc
import io

import torch

from mimo_v2_flash.checkpoint.reused_memory import RecycledStorages, owning_just_its_bytes


def _address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_memory_is_reused_only_after_every_reference_is_gone():
    pool = RecycledStorages()
    first = pool.empty((64, 32), torch.bfloat16)
    first.fill_(1.0)
    address = _address(first)
    view = first[8:16]
    del first
    held = pool.empty((64, 32), torch.bfloat16)  # a view keeps the first storage busy
    assert _address(held) != address
    exported = torch.from_dlpack(view)
    del view
    assert _address(pool.empty((64, 32), torch.bfloat16)) != address  # a DLPack export keeps it busy too
    assert bool((exported == 1.0).all())
    del exported
    gc.collect()
    assert _address(pool.empty((64, 32), torch.bfloat16)) == address


def test_a_reused_storage_holds_exactly_the_tensors_bytes():
    pool = RecycledStorages()
    big = pool.empty((100, 10), torch.float32)
    address = _address(big)
    del big
    smaller = pool.empty((60, 10), torch.float32)  # fits in the free 4000-byte storage (at least half of it)
    assert smaller.data_ptr() == address
    assert smaller.untyped_storage().nbytes() == smaller.nbytes == 2400
    assert smaller.is_contiguous() and smaller.shape == (60, 10) and smaller.dtype == torch.float32
    smaller.copy_(torch.arange(600.0).view(60, 10))
    assert torch.equal(smaller.clone(), torch.arange(600.0).view(60, 10))


def test_a_free_storage_is_not_given_to_a_request_under_half_its_size():
    pool = RecycledStorages()
    big = pool.empty((1000,), torch.uint8)
    address = _address(big)
    del big
    assert pool.empty((499,), torch.uint8).data_ptr() != address
    assert pool.empty((500,), torch.uint8).data_ptr() == address


def test_free_storages_kept_for_reuse_stay_within_the_byte_bound():
    pool = RecycledStorages(max_free_bytes=8000)
    addresses = []
    for size in (1000, 2500, 6000, 9000):  # sizes too far apart to reuse each other
        tensor = pool.empty((size,), torch.uint8)
        addresses.append(tensor.data_ptr())
        assert pool.free_bytes() <= 8000  # at the 9000-byte request, the two oldest free storages are released
        del tensor
    assert pool.free_bytes() == 6000 + 9000  # the last one became free after its request
    reused = pool.empty((9000,), torch.uint8)
    assert reused.data_ptr() == addresses[3]
    assert pool.free_bytes() == 6000
    assert pool.empty((6000,), torch.uint8).data_ptr() == addresses[2]


def test_storages_held_by_callers_are_forgotten_beyond_max_tracked():
    pool = RecycledStorages(max_tracked=4)
    held = [pool.empty((100,), torch.uint8) for _ in range(10)]
    assert len(pool._storages) == 4
    del held
    assert pool.free_bytes() == 400


def test_live_tensors_never_share_memory():
    pool = RecycledStorages()
    live = [pool.empty((16, 16), torch.float32) for _ in range(5)]
    for i, tensor in enumerate(live):
        tensor.fill_(float(i))
    assert len({t.data_ptr() for t in live}) == 5
    assert [float(t[3, 3]) for t in live] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_contiguous_part_is_handed_over_owning_just_its_bytes():
    whole = torch.arange(40, dtype=torch.bfloat16).view(10, 4)
    half = owning_just_its_bytes(whole[5:])
    assert half.untyped_storage().nbytes() == half.nbytes == 40
    assert half.data_ptr() == whole[5:].data_ptr() and torch.equal(half, whole[5:])
    saved = io.BytesIO()
    torch.save(half, saved)
    saved.seek(0)
    assert torch.equal(torch.load(saved), whole[5:])
    assert owning_just_its_bytes(whole) is whole
    column = whole[:, 1]
    assert owning_just_its_bytes(column) is column  # not contiguous: the writer's own copy handles it
