"""The fused ``qkv_proj`` layout at both ends: MiMo-V2.5's real shapes (4 chunks, 32 column blocks: full layer
[13568, 4096] with a [108, 32] scale, SWA layer [14848, 4096] with [116, 32]) and a tiny one (2 column blocks, 1-2
KV heads). Each chunk is quantized on its own grid by the test reference; the reader must decide ``per_rank:T``
from the config / index and dequantize exactly as the reference does, and refuse a ``T`` the scales contradict."""

from __future__ import annotations

import json

import pytest
import torch
from fp8_reference import dequantize_grid, quantize_grid
from safetensors.torch import save_file

from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint

NAME = "model.layers.{}.self_attn.qkv_proj.weight"


def _write(directory, cfg, chunks, rows_by_layer, cols, index_tp_size=None):
    gen = torch.Generator().manual_seed(0)
    tensors, truth = {}, {}
    for layer, rows in rows_by_layer.items():
        parts = [quantize_grid(torch.randn(rows // chunks, cols, generator=gen), (128, 128)) for _ in range(chunks)]
        tensors[NAME.format(layer)] = torch.cat([q for q, _ in parts])
        tensors[NAME.format(layer) + "_scale_inv"] = torch.cat([s for _, s in parts])
        truth[NAME.format(layer)] = torch.cat([dequantize_grid(q, s, (128, 128)) for q, s in parts])
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    index = {"metadata": {} if index_tp_size is None else {"tp_size": index_tp_size},
             "weight_map": dict.fromkeys(tensors, "model.safetensors")}  # fmt: skip
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = dict(cfg, attention_projection_layout="fused_qkv", quantization_config={"weight_block_size": [128, 128]})
    (directory / "config.json").write_text(json.dumps(cfg))
    return truth


V25 = {"num_attention_heads": 64, "num_key_value_heads": 4, "swa_num_key_value_heads": 8, "head_dim": 192,
       "v_head_dim": 128, "hidden_size": 4096, "hybrid_layer_pattern": [0, 1]}  # fmt: skip
TINY = {"num_attention_heads": 4, "num_key_value_heads": 1, "swa_num_key_value_heads": 2, "head_dim": 192,
        "v_head_dim": 128, "hidden_size": 256, "hybrid_layer_pattern": [0, 1]}  # fmt: skip


@pytest.mark.parametrize(
    "cfg, chunks, rows, cols, layouts",
    [
        # V2.5: full chunk 3392 rows = 26.5 blocks (27 per chunk, 108 rows; a plain grid gives 106); SWA chunk
        # 3712 rows = 29 whole blocks (116 rows, the same as a plain grid: named both).
        (V25, 4, {0: 13568, 1: 14848}, 4096, {0: "per_rank:4", 1: "per_rank:4 = grid"}),
        # Tiny, one chunk: 4 x 192 + 192 + 128 = 1088 rows on full layers; 1216 on SWA layers.
        (TINY, 1, {0: 1088, 1: 1216}, 256, {0: "per_rank:1 = grid", 1: "per_rank:1 = grid"}),
    ],
    ids=["v2.5_real_size", "tiny"],
)
def test_per_chunk_grids_are_read_exactly(tmp_path, cfg, chunks, rows, cols, layouts):
    truth = _write(tmp_path / "ckpt", cfg, chunks, rows, cols)
    reader = FP8Checkpoint(HFCheckpoint(tmp_path / "ckpt"))
    for layer, expected in layouts.items():
        layout = reader.layout(NAME.format(layer))
        assert " = ".join([layout.kind, *layout.aliases]) == expected
        assert torch.equal(reader.get(NAME.format(layer)), truth[NAME.format(layer)])


def test_real_size_index_tp_size_the_scales_contradict_is_refused(tmp_path):
    _write(tmp_path / "ckpt", V25, 4, {0: 13568}, 4096, index_tp_size=2)
    with pytest.raises(CheckpointError, match=r"T=2 chunks \(from index metadata.tp_size\).*need 106"):
        FP8Checkpoint(HFCheckpoint(tmp_path / "ckpt")).layout(NAME.format(0))
