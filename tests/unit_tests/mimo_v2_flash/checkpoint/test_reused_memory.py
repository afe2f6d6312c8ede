"""A contiguous part of a larger storage is handed to the writer as the same memory owning just its bytes."""

from __future__ import annotations

import io

import torch

from mimo_v2_flash.checkpoint.reused_memory import owning_just_its_bytes


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
