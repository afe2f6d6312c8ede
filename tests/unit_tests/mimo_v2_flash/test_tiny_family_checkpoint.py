"""``make_tiny_checkpoint.py --family [--mxfp4]``: a checkpoint in the MiMo-V2 family's format that the importer reads
as the family is stored (fused qkv_proj in 2 chunks, towers, MXFP4 experts) and that runs."""

from __future__ import annotations

import json

import torch
from mimo_testing import megatron_logits

from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
from mimo_v2_flash.checkpoint.validation import tower_counts, validate_checkpoint
from mimo_v2_flash.make_tiny_checkpoint import main as make_tiny


def test_family_maker_writes_what_the_importer_reads_as_the_family(tmp_path, parallel_state):
    out = tmp_path / "v26"
    assert make_tiny(["--output", str(out), "--family", "--mxfp4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["attention_projection_layout"]) == (["MiMoV2ForCausalLM"], "fused_qkv")
    checkpoint = HFCheckpoint(out)
    validate_checkpoint(checkpoint)
    layouts = FP8Checkpoint(checkpoint).resolve_all()
    assert layouts["per_rank:2"] == 5 and layouts["mxfp4"] == 36  # 4 + 1 MTP fused blocks; 3 MoE layers x 4 x 3
    assert set(tower_counts(checkpoint.keys())) == {"visual", "audio_encoder", "speech_embeddings"}
    assert checkpoint.index_metadata["tp_size"] == 2
    logits = megatron_logits(out, torch.tensor([[3, 14, 15, 92]]))
    assert logits.shape == (1, 4, config["vocab_size"]) and bool(torch.isfinite(logits).all())


def test_mxfp4_needs_family(tmp_path, capsys):
    assert make_tiny(["--output", str(tmp_path / "x"), "--mxfp4"]) == 2
    assert "--family" in capsys.readouterr().err and not (tmp_path / "x").exists()
