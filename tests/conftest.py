"""Shared fixtures: one Megatron parallel state per test process, tiny checkpoints built on the fly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime
from mimo_v2_flash.runtime.framework_logs import quiet_framework_logs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def cpu_host():
    """Upstream code runs on this host for the whole session, as under the launchers (no-op with CUDA and TE);
    the frameworks' import-time notices are not shown."""
    with quiet_framework_logs(), cpu_runtime(training=True, peft=True) as applied:
        yield applied


@pytest.fixture(scope="session")
def parallel_state():
    """Single-process gloo group + Megatron model-parallel state (TP=PP=EP=1)."""
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

    initialize_parallel_state()
    yield


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """The default tiny checkpoint (fp32, one MTP layer, tokenizer)."""
    from mimo_v2_flash.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", mtp_layers=1)
