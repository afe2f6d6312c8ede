"""Context parallelism on TransformerEngine: which layouts TE can run, decided before anything is built.

TE's rule (its ``context_parallel.py``; ``../shared/reference/mimo_v2_family_facts.md``), written out here: a
learnable sink runs only with ``a2a``; a sliding window only with ``a2a`` or ``all_gather``; ``a2a`` splits each
rank's query and KV heads over the CP ranks; before TE 2.16 a Q/K head dim different from V's allowed only ``p2p``.
"""

from __future__ import annotations

import pytest

from mimo_v2_flash.config import MiMoV2FlashConfigError, parse_architecture, released_config
from mimo_v2_flash.planning import parallel_layout
from mimo_v2_flash.planning.parallel_layout import check_parallel_layout, te_context_parallel_comm_type
from mimo_v2_flash.tiny_checkpoint import tiny_config

RELEASED = parse_architecture(released_config())  # 64 Q heads; KV heads: 4 full, 8 SWA; Q/K 192, V 128


@pytest.fixture
def te_version(monkeypatch):
    def installed(version):
        monkeypatch.setattr(parallel_layout, "transformer_engine_version", lambda: version)

    return installed


@pytest.mark.parametrize(
    "window, sink, legal",
    [(False, False, {"p2p", "a2a", "all_gather"}), (True, False, {"a2a", "all_gather"}), (True, True, {"a2a"})],
)
def test_each_layer_kind_gets_a_communication_te_runs_it_with(window, sink, legal):
    assert te_context_parallel_comm_type(window, sink) in legal
    # p2p where legal: it keeps every head on every rank, so it fits full layers' few KV heads at any TP.
    assert (te_context_parallel_comm_type(window, sink) == "p2p") == ("p2p" in legal)


@pytest.mark.parametrize("tp, cp", [(4, 2), (2, 4), (1, 8), (2, 2)])
def test_released_layouts_te_can_run_are_accepted(te_version, tp, cp):
    te_version((2, 16))
    # SWA: 64/tp Q and 8/tp KV heads per rank, each divisible by cp; full layers run p2p (any head count).
    check_parallel_layout(RELEASED, tp=tp, cp=cp, seq_length=4096, transformer_engine=True)


@pytest.mark.parametrize(
    "tp, cp, message",
    [
        (8, 2, "sliding-window layers run cp_comm_type a2a .* a rank holds 1 KV head\\(s\\) \\(8 / --tp 8\\)"),
        (4, 4 * 2, "a rank holds 2 KV head\\(s\\) \\(8 / --tp 4\\)"),
        (1, 3, "a rank holds 64 query head\\(s\\) \\(64 / --tp 1\\)"),
    ],
)
def test_released_layouts_a2a_cannot_split_are_refused(te_version, tp, cp, message):
    te_version((2, 20))
    with pytest.raises(MiMoV2FlashConfigError, match=message):
        check_parallel_layout(RELEASED, tp=tp, cp=cp, transformer_engine=True)


def test_te_before_2_16_is_refused_with_the_version_found(te_version):
    te_version((2, 14))
    with pytest.raises(MiMoV2FlashConfigError, match=r"TransformerEngine 2\.14: .* only from TE 2\.16 \(TE #2719\)"):
        check_parallel_layout(RELEASED, tp=4, cp=2, transformer_engine=True)
    with pytest.raises(MiMoV2FlashConfigError, match=r"TransformerEngine 2\.14"):
        check_parallel_layout(None, cp=2, transformer_engine=True)  # the recipe's check, before the model is read


def test_te_not_installed_is_refused(te_version):
    te_version(None)
    with pytest.raises(MiMoV2FlashConfigError, match="TransformerEngine is not installed"):
        check_parallel_layout(RELEASED, tp=4, cp=2, transformer_engine=True)


def test_full_layers_with_sinks_run_a2a_too(te_version):
    te_version((2, 16))
    arch = parse_architecture(tiny_config(add_full_attention_sink_bias=True))
    heads = arch.full_num_kv_heads
    with pytest.raises(MiMoV2FlashConfigError, match="full-attention layers run cp_comm_type a2a \\(their sink"):
        check_parallel_layout(arch, cp=2 * heads, transformer_engine=True)


def test_the_local_backend_needs_no_te(te_version):
    te_version(None)
    check_parallel_layout(RELEASED, tp=8, cp=2, seq_length=4096, transformer_engine=False)
