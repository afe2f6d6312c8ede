"""The family's fused ``qkv_proj``: chunk count from the index or the config, whole heads per chunk, and the
(de-)interleaving of rank chunks, checked against row lists built head by head."""

from __future__ import annotations

import pytest
import torch

from mimo_v2_flash.checkpoint.fused_qkv import (
    FusedQKVError,
    fuse_qkv,
    fuse_qkv_stream,
    fused_chunks,
    split_fused_qkv,
)

CONFIG = {"num_attention_heads": 8, "num_key_value_heads": 2, "swa_num_key_value_heads": 4}


def test_chunk_count_comes_from_the_index_else_the_kv_heads():
    assert fused_chunks(CONFIG) == 2
    assert fused_chunks(CONFIG, {"tp_size": "1"}) == 1  # safetensors metadata values are strings
    assert fused_chunks(CONFIG, {"tp_size": 2, "total_size": 10}) == 2


@pytest.mark.parametrize("metadata, fragment", [({"tp_size": 4}, "tp_size=4"), ({"tp_size": "x"}, "tp_size='x'")])
def test_chunks_that_cut_heads_are_refused(metadata, fragment):
    with pytest.raises(FusedQKVError, match=fragment):
        fused_chunks(CONFIG, metadata)


def _labelled(heads: int, dim: int, tag: int) -> torch.Tensor:
    """Rows labelled (tag, head, row within head) in three columns."""
    return torch.tensor([[tag, h, r] for h in range(heads) for r in range(dim)], dtype=torch.float32)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_split_and_fuse_follow_the_rank_chunks(chunks):
    heads, kv, dk, dv = 8, 4, 3, 2
    q, k, v = _labelled(heads, dk, 0), _labelled(kv, dk, 1), _labelled(kv, dv, 2)
    expected = []
    for c in range(chunks):  # chunk c: its query heads, then its KV heads' K rows, then their V rows
        expected += [row for row in q.tolist() if row[1] // (heads // chunks) == c]
        expected += [row for row in k.tolist() if row[1] // (kv // chunks) == c]
        expected += [row for row in v.tolist() if row[1] // (kv // chunks) == c]
    fused = fuse_qkv(q, k, v, chunks)
    assert fused.tolist() == expected
    for got, want in zip(split_fused_qkv(fused, chunks, heads, kv, dk, dv), (q, k, v), strict=True):
        assert torch.equal(got, want)


def test_wrong_row_count_is_named():
    with pytest.raises(FusedQKVError, match="model.layers.3.self_attn.qkv_proj.weight"):
        split_fused_qkv(torch.zeros(10, 2), 2, 8, 4, 3, 2, "model.layers.3.self_attn.qkv_proj.weight")


def test_stream_fuses_each_block_and_passes_the_rest():
    q, k, v = _labelled(4, 2, 0), _labelled(2, 2, 1), _labelled(2, 1, 2)
    stream = [
        ("model.norm.weight", torch.ones(3)),
        ("model.layers.0.self_attn.q_proj.weight", q),
        ("model.layers.0.self_attn.k_proj.weight", k),
        ("model.layers.0.self_attn.v_proj.weight", v),
        ("model.layers.0.self_attn.o_proj.weight", torch.ones(2)),
    ]
    out = list(fuse_qkv_stream(stream, 2))
    assert [name for name, _ in out] == [
        "model.norm.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ]
    assert torch.equal(out[1][1], fuse_qkv(q, k, v, 2))
    with pytest.raises(FusedQKVError, match="only"):
        list(fuse_qkv_stream(stream[:3], 2))
