"""What the TE core attention hands TransformerEngine under context parallelism, checked without TE.

TransformerEngine is not installed here, so its ``TEDotProductAttention`` is replaced, for these tests only, by a
base class that records what MiMo's subclass passes it; the product code imports the real one lazily.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.layer_specs import te_core_attention_class
from mimo_v2_flash.config import FULL_ATTENTION, SLIDING_ATTENTION


@pytest.fixture
def handed_to_te(monkeypatch) -> list[tuple]:
    """(window, softmax type, cp_comm_type) of every TE core attention built during the test."""
    seen = []

    class RecordingTEDotProductAttention(torch.nn.Module):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            super().__init__()
            seen.append((config.window_size, config.softmax_type, kwargs.get("cp_comm_type")))

    extension = types.ModuleType("megatron.core.extensions.transformer_engine")
    extension.TEDotProductAttention = RecordingTEDotProductAttention
    monkeypatch.setitem(sys.modules, extension.__name__, extension)
    return seen


def model_config(cp: int) -> SimpleNamespace:
    return SimpleNamespace(
        attention_layer_types=(FULL_ATTENTION, SLIDING_ATTENTION),
        sliding_window_size=4,
        full_attention_sink=False,
        swa_attention_sink=True,
        context_parallel_size=cp,
        kv_channels=192,
        v_head_dim=128,
        perform_initialization=False,
    )


def test_each_layer_runs_the_communication_of_its_own_kind(handed_to_te):
    core, config = te_core_attention_class(), model_config(cp=2)
    # Megatron-Core passes each layer the entry of the per-layer list at its layer number; an MTP layer's number is
    # its own (1), so it is handed decoder layer 1's entry (a full layer: p2p) although it is sliding-window.
    core(config, 1, AttnMaskType.causal, "self", cp_comm_type="p2p")
    core(config, 2, AttnMaskType.causal, "self", cp_comm_type="a2a")
    core(config, 1, AttnMaskType.causal, "self", attention_kind=SLIDING_ATTENTION, cp_comm_type="p2p")
    # TE runs a learnable sink only with a2a, and a window only with a2a or all_gather.
    assert handed_to_te == [(None, "vanilla", "p2p"), ((4, 0), "learnable", "a2a"), ((4, 0), "learnable", "a2a")]


def test_without_context_parallelism_nothing_is_chosen(handed_to_te):
    te_core_attention_class()(model_config(cp=1), 2, AttnMaskType.causal, "self")
    assert handed_to_te == [((4, 0), "learnable", None)]
