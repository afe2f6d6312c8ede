"""The streaming import's thread budget: one core stays free for the checkpoint file writer, and is given back."""

from __future__ import annotations

import threading

import pytest
import torch

from megatron.bridge.models.mimo_v2_flash.streaming_import import one_core_for_the_writer


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_intra_op_threads_leave_one_core_and_are_restored_after_an_error(three_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with one_core_for_the_writer():
            assert torch.get_num_threads() == 2
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 3


def test_a_thread_started_inside_takes_the_reduced_count(three_threads):
    seen = []
    with one_core_for_the_writer():
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
    assert seen == [2]


def test_never_below_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with one_core_for_the_writer():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
