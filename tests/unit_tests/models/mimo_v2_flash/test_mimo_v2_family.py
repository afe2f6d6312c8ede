"""MiMo-V2 family checkpoints (``MiMoV2ForCausalLM``, fused pre-sharded FP8 ``qkv_proj``, towers) load exactly:
the same Megatron model as the split checkpoint of the reference-dequantized weights, and transformers' native
MiMo-V2-Flash logits (the math is the same) within 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch
from family_reference import BLOCK, FAMILY, write_family_checkpoint
from mimo_testing import hf_logits, megatron_model

from mimo_v2_flash.tiny_checkpoint import write_tiny_checkpoint

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def split_source(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("split") / "hf", FAMILY, mtp_layers=1, seed=8)


def _family(split_source, tmp_path, **kwargs):
    family, oracle = tmp_path / "family", tmp_path / "oracle"
    write_family_checkpoint(split_source, family, oracle, chunks=2, block=BLOCK, **kwargs)
    return family, oracle


def _logits(model, ids):
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).float()


@pytest.mark.parametrize(
    "index_tp_size, mxfp4", [(None, False), (2, True)], ids=["v2.5_kv_heads", "v2.6_tp_size_mxfp4"]
)
def test_family_checkpoint_loads_as_the_same_model(split_source, tmp_path, parallel_state, index_tp_size, mxfp4):
    family, oracle = _family(split_source, tmp_path, index_tp_size=index_tp_size, mxfp4=mxfp4)
    ours, reference = megatron_model(family), megatron_model(oracle)
    ours_params, reference_params = dict(ours.named_parameters()), dict(reference.named_parameters())
    assert sorted(ours_params) == sorted(reference_params)
    assert any(".mtp." in n or n.startswith("mtp.") for n in ours_params)  # MTP imported, not dropped
    for name, param in ours_params.items():
        assert torch.equal(param, reference_params[name]), name

    ids = torch.randint(0, FAMILY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    oracle_logits = hf_logits(oracle, ids)
    assert (_logits(ours, ids) - oracle_logits).abs().max().item() <= TOLERANCE
