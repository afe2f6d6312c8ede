"""The local attention's context-parallel positions are the tokens Megatron-Core's own batch split gives each rank."""

from __future__ import annotations

import pytest
import torch
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.context_parallel import (
    gathered_positions,
    local_positions,
)
from mimo_v2_flash.runtime.cpu_adaptations import cuda_literals_on_cpu


class _Group:
    """The two methods Megatron's split reads from a context-parallel group."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("size", [2, 4])
def test_positions_are_megatrons_split(size, monkeypatch):
    # Megatron's split asks torch.distributed for the group's size and rank: answered by the stand-in group.
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: group.size())
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: group.rank())
    seq = 8 * size
    for rank in range(size):
        batch = {"tokens": torch.arange(seq).unsqueeze(0), "cu_seqlens": None}
        with cuda_literals_on_cpu():
            split = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=_Group(rank, size))
        assert local_positions(seq // size, rank, size).tolist() == split["tokens"][0].tolist()
    assert sorted(gathered_positions(seq // size, size).tolist()) == list(range(seq))


def test_odd_local_length_is_refused():
    with pytest.raises(ValueError, match="even"):
        local_positions(3, 0, 2)
