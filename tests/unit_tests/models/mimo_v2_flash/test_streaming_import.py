"""The streaming import's writer settings: one core stays free for the file writer and torch.save skips CRC32,
each undone afterwards."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from megatron.bridge.models.mimo_v2_flash.streaming_import import (
    one_core_for_the_writer,
    records_without_crc32,
)


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


def test_records_are_saved_without_crc32_and_still_load_then_the_option_returns():
    before = torch.serialization.get_crc32_options()
    with pytest.raises(RuntimeError, match="boom"):
        with records_without_crc32():
            assert torch.serialization.get_crc32_options() is False
            saved = io.BytesIO()
            torch.save(torch.arange(8), saved)
            raise RuntimeError("boom")
    assert torch.serialization.get_crc32_options() == before
    saved.seek(0)
    assert torch.equal(torch.load(saved), torch.arange(8))
