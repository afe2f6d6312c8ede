"""Fixtures for the neuron_export unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ne_helpers import build_checkpoints, import_fake_adapter


@pytest.fixture(scope="session")
def ne_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("neuron_export"))


@pytest.fixture
def fake_nxdi():
    """The fake NxDI SDK imported in-process; its modules are removed again afterwards."""
    saved_path, before = list(sys.path), set(sys.modules)
    modeling, config, hf_adapter = import_fake_adapter()
    modeling.NeuronMiMoV2ForCausalLM._router_bias_patched = False
    yield modeling, config, hf_adapter
    sys.path[:] = saved_path
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("modeling_mimo_v2", "neuronx_distributed_inference"):
            del sys.modules[name]
