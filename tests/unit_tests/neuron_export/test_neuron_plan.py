"""``plan`` on the released config (TP 64 / EP 64 on trn2.48xlarge) and the layout rules, each able to fail."""

from __future__ import annotations

import json

import pytest
from ne_helpers import REAL_CONFIG

from mimo_v2_flash import config as mimo_config
from neuron_export.cli import main
from neuron_export.layout import Layout, layout_problems
from neuron_export.memory import plan_memory
from neuron_export.plan import plan

GIB = 1024**3


@pytest.fixture(scope="module")
def real_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "config.json"
    path.write_text(json.dumps(REAL_CONFIG))
    return path


@pytest.fixture(scope="module")
def arch():
    return mimo_config.parse_architecture(REAL_CONFIG)


def test_real_model_at_tp64_ep64(real_config, capsys):
    result = plan(real_config, Layout(tp=64, ep=64, moe_tp=1, batch_size=32, seq_len=8192), config_only=True)
    assert result.problems == []
    memory = result.memory
    assert memory.prepared_bytes / 1e9 == pytest.approx(617.6, abs=0.1)  # BF16 weights without MTP
    assert memory.weights_per_rank / 1e9 == pytest.approx(9.86, abs=0.02)  # ~9.8 GB per rank
    assert memory.weights_by_part["experts"] == 47 * 4 * 3 * 2048 * 4096 * 2  # 4 whole experts per rank per layer
    # CONVERT_TO_MHA: 64 KV heads over 64 ranks -> 1 head per rank; V padded 128 -> 192.
    assert (memory.cache_heads_per_rank, memory.cache_head_dim) == (1, 192)
    assert memory.kv_cache_per_rank == 48 * 2 * 32 * 8192 * 1 * 192 * 2
    assert memory.hbm_per_rank == 24 * GIB and memory.used_per_rank < memory.hbm_per_rank
    assert "result     feasible" in result.text
    assert main(["plan", "--hf-path", str(real_config), "--config-only", "--tp", "64", "--ep", "64"]) == 0
    assert "budget 24.00 GiB (64 logical cores at LNC 2)" in capsys.readouterr().out


def test_gqa_layout_pads_full_kv_heads(arch):
    assert layout_problems(arch, Layout(tp=4, ep=4, moe_tp=1)) == []
    memory = plan_memory(arch, Layout(tp=4, ep=4, moe_tp=1))
    assert memory.cache_heads_per_rank == 2  # max(4, 8) KV heads / TP 4: full layers padded 4 -> 8


@pytest.mark.parametrize(
    "layout, fragment",
    [
        (Layout(batch_size=16), "use --batch-size >= 32"),
        (Layout(tp=8, ep=8), "lies between the KV head counts"),
        (Layout(tp=2, ep=2, moe_tp=1, batch_size=32), None),  # GQA: 2 divides 4 and 8 (memory fails, not rules)
        (Layout(tp=64, ep=32, moe_tp=1), "must equal TP 64"),
        (Layout(tp=64, ep=64, moe_tp=2), "must equal TP 64"),
        (Layout(tp=48, ep=48, moe_tp=1), "does not divide the 64 attention heads"),
        (Layout(tp=128, ep=128, logical_nc_config=2), "has 64 at LNC 2"),
        (Layout(tp=64, ep=64, instance="trn2.3xlarge"), "has 4 at LNC 2"),
        (Layout(seq_len=300_000), "exceeds max_position_embeddings"),
        (Layout(tp=64, ep=1, moe_tp=64, max_context_length=16384), "exceeds seq_len"),
    ],
)
def test_layout_rules(arch, layout, fragment):
    problems = layout_problems(arch, layout)
    if fragment is None:
        assert problems == []
    else:
        assert any(fragment in p for p in problems), problems


def test_ep_must_divide_experts(arch):
    cfg = dict(REAL_CONFIG, n_routed_experts=96)
    odd = mimo_config.parse_architecture(cfg)
    assert any(
        "does not divide the 96 experts" in p for p in layout_problems(odd, Layout(tp=64, ep=64, batch_size=32))
    )


def test_hbm_budget_is_enforced(real_config):
    result = plan(real_config, Layout(seq_len=32768), config_only=True)
    assert len(result.problems) == 1 and "above the 24.00 GiB budget" in result.problems[0]
    assert "at most 13487 tokens at batch 32" in result.problems[0]
    lean = plan(real_config, Layout(tp=64, ep=1, moe_tp=64, batch_size=1, seq_len=1024), config_only=True)
    assert lean.problems == [] and lean.memory.weights_per_rank == pytest.approx(
        result.memory.weights_per_rank, rel=1e-3
    )


def test_lnc1_halves_the_budget(real_config):
    result = plan(real_config, Layout(logical_nc_config=1), config_only=True)
    assert result.memory.hbm_per_rank == 12 * GIB
    assert any("above the 12.00 GiB budget" in p for p in result.problems)
