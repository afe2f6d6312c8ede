"""FP8 K/V scale layouts: every layout decided from the data and dequantized exactly (against the tests' own
reference quantizer and element-wise dequantizer), the V-on-shapes hazard, ambiguous and contradicted data,
forced layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fp8_reference
import pytest
import torch
from safetensors.torch import save_file

from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint

P = "model.layers.1.self_attn."


def kv_reader(directory: Path, quantized, dk: int, dv: int, block, kv_layout: str = "auto") -> FP8Checkpoint:
    qk, sk, qv, sv = quantized
    tensors = {P + "k_proj.weight": qk, P + "k_proj.weight_scale_inv": sk}
    tensors |= {P + "v_proj.weight": qv, P + "v_proj.weight_scale_inv": sv}
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(directory / "model.safetensors"))
    config = {
        "hidden_size": 256,
        "num_attention_heads": 2,
        "head_dim": dk,
        "v_head_dim": dv,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return FP8Checkpoint(HFCheckpoint(directory), kv_layout)


def random_kv(heads: int, dk: int, dv: int, cols: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(heads * dk, cols, generator=generator), torch.randn(heads * dv, cols, generator=generator) * 3


SHAPES = [(4, 192, 128, (128, 128), 1024), (8, 192, 128, (128, 128), 512), (2, 24, 16, (16, 16), 128)]


@pytest.mark.parametrize("heads, dk, dv, block, cols", SHAPES)
@pytest.mark.parametrize("layout", fp8_reference.LAYOUTS)
def test_every_layout_is_decided_from_the_data_and_exact(layout, heads, dk, dv, block, cols, tmp_path):
    """Includes the release's shapes: full k_proj [768, 4096]-like with 4 KV heads, SWA with 8."""
    k, v = random_kv(heads, dk, dv, cols)
    quantized = fp8_reference.quantize(k, v, heads, block, layout)
    reader = kv_reader(tmp_path, quantized, dk, dv, block)
    want_k, want_v = fp8_reference.dequantize(*quantized, heads, block, layout)
    # V first: its layout must come from the pair, never from its shapes alone.
    for name, want in ((P + "v_proj.weight", want_v), (P + "k_proj.weight", want_k)):
        decided = reader.layout(name)
        assert layout in (decided.kind, *decided.aliases), decided.evidence
        assert torch.equal(reader.get(name), want), name
        assert torch.equal(reader.get(name, torch.bfloat16), want.to(torch.bfloat16)), name
    assert (reader.get(P + "v_proj.weight") - v).abs().max() < 0.1 * v.abs().max()  # fixture sanity


def test_v_is_never_read_by_its_shapes_alone(tmp_path):
    """Under fused_kv_split V [512, 4096] has a plain-grid scale shape [4, 32]; reading it on that grid puts the
    wrong scale on half of every head (the ~6x error reported for the release)."""
    heads, dk, dv, block = 4, 192, 128, (128, 128)
    k, v = random_kv(heads, dk, dv, 1024, seed=1)
    v[torch.arange(heads) * dv] *= 8.0  # V rows 0-63 share K's last block: make that block's scale differ a lot
    quantized = fp8_reference.quantize(k, v, heads, block, "fused_kv_split")
    reader = kv_reader(tmp_path, quantized, dk, dv, block)
    _, want_v = fp8_reference.dequantize(*quantized, heads, block, "fused_kv_split")
    _, on_the_grid = fp8_reference.dequantize(*quantized, heads, block, "grid")
    assert not torch.equal(want_v, on_the_grid)
    assert reader.layout(P + "v_proj.weight").kind == "fused_kv_split"
    assert torch.equal(reader.get(P + "v_proj.weight"), want_v)


def test_candidates_the_data_cannot_tell_apart_are_an_error_listing_them(tmp_path):
    """Every FP8 value at 448: every candidate holds the maximum everywhere, and their scales differ."""
    heads, dk, dv, block = 2, 24, 16, (16, 16)
    qk = torch.full((heads * dk, 32), 448.0).to(torch.float8_e4m3fn)
    qv = torch.full((heads * dv, 32), 448.0).to(torch.float8_e4m3fn)
    sk, sv = torch.rand(4, 2) + 0.5, torch.rand(2, 2) + 0.5  # fits per_rank:2 and fused_kv_split (= rank_fused:2)
    reader = kv_reader(tmp_path, (qk, sk, qv, sv), dk, dv, block)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight weight \(48, 32\) scale \(4, 2\).*ambiguous") as error:
        reader.get(P + "k_proj.weight")
    assert re.search(r"fused_kv_split[^;]* 12/12 blocks at 448", str(error.value)) and "\n" not in str(error.value)


@pytest.mark.parametrize(("recorded", "decided"), [("fused_kv_split", "fused_kv_split"), ("per_rank:2", "per_rank:2")])
def test_a_writers_record_chooses_among_the_layouts_the_data_allows(tmp_path, recorded, decided):
    """Data that fits several layouts (tiny, every value at 448) is read as the writer recorded it."""
    heads, dk, dv, block = 2, 24, 16, (16, 16)
    qk = torch.full((heads * dk, 32), 448.0).to(torch.float8_e4m3fn)
    qv = torch.full((heads * dv, 32), 448.0).to(torch.float8_e4m3fn)
    sk, sv = torch.rand(4, 2) + 0.5, torch.rand(2, 2) + 0.5
    tmp_path.mkdir(exist_ok=True)
    record = {"kv_layout": "auto", "layouts": {P + "k_proj.weight": recorded, P + "v_proj.weight": recorded}}
    (tmp_path / "fp8_layouts.json").write_text(json.dumps(record))
    reader = kv_reader(tmp_path, (qk, sk, qv, sv), dk, dv, block)
    assert reader.layout(P + "v_proj.weight").kind == decided
    want_k, want_v = fp8_reference.dequantize(qk, sk, qv, sv, heads, block, decided)
    assert torch.equal(reader.get(P + "k_proj.weight"), want_k) and torch.equal(
        reader.get(P + "v_proj.weight"), want_v
    )


def test_a_record_the_data_contradicts_is_not_followed(tmp_path):
    """A recorded layout is only a tie-break: fused_kv_split data recorded as grid is still read as fused_kv_split."""
    heads, dk, dv, block = 4, 192, 128, (128, 128)
    quantized = fp8_reference.quantize(*random_kv(heads, dk, dv, 1024, seed=3), heads, block, "fused_kv_split")
    tmp_path.mkdir(exist_ok=True)
    record = {"layouts": {P + "k_proj.weight": "grid", P + "v_proj.weight": "grid"}}
    (tmp_path / "fp8_layouts.json").write_text(json.dumps(record))
    reader = kv_reader(tmp_path, quantized, dk, dv, block)
    assert reader.layout(P + "k_proj.weight").kind == "fused_kv_split"


def test_an_unreadable_record_is_a_one_line_error(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "fp8_layouts.json").write_text("{not json")
    quantized = fp8_reference.quantize(*random_kv(2, 24, 16, 32), 2, (16, 16), "grid")
    with pytest.raises(CheckpointError, match=r"fp8_layouts\.json: unreadable FP8 layout record") as error:
        kv_reader(tmp_path, quantized, 24, 16, (16, 16))
    assert "\n" not in str(error.value)


def test_data_no_candidate_explains_is_an_error(tmp_path):
    heads, dk, dv, block = 4, 192, 128, (128, 128)
    quantized = list(fp8_reference.quantize(*random_kv(heads, dk, dv, 256), heads, block, "fused_kv_split"))
    quantized[0] = (quantized[0].float() * 0.5).to(torch.float8_e4m3fn)  # K no longer reaches 448 anywhere
    quantized[2] = (quantized[2].float() * 0.5).to(torch.float8_e4m3fn)
    reader = kv_reader(tmp_path, quantized, dk, dv, block)
    with pytest.raises(CheckpointError, match="every candidate contradicts the data.*blocks lack"):
        reader.layout(P + "v_proj.weight")


def test_fused_kv_with_differing_copies_of_a_shared_scale_is_refused(tmp_path):
    heads, dk, dv, block = 4, 192, 128, (128, 128)
    qk, sk, qv, sv = fp8_reference.quantize(*random_kv(heads, dk, dv, 256), heads, block, "fused_kv")
    sv = sv.clone()
    sv[0] *= 2  # head 0's shared block now has two different scales
    reader = kv_reader(tmp_path, (qk, sk, qv, sv), dk, dv, block)
    with pytest.raises(CheckpointError, match="shared K|V block scales differ"):
        reader.get(P + "k_proj.weight")


def test_forced_layout_is_used_and_a_contradicted_one_fails(tmp_path):
    heads, dk, dv, block = 4, 192, 128, (128, 128)
    quantized = fp8_reference.quantize(*random_kv(heads, dk, dv, 1024, seed=2), heads, block, "fused_kv_split")
    want_k, want_v = fp8_reference.dequantize(*quantized, heads, block, "fused_kv_split")
    forced = kv_reader(tmp_path / "right", quantized, dk, dv, block, "fused_kv_split")
    assert forced.layout(P + "v_proj.weight").kind == "fused_kv_split"
    assert torch.equal(forced.get(P + "k_proj.weight"), want_k) and torch.equal(
        forced.get(P + "v_proj.weight"), want_v
    )
    # per_rank:4 fits the shapes (K [768] in four 192-row slices: 8 scale rows; V 4) but not the data.
    wrong = kv_reader(tmp_path / "wrong", quantized, dk, dv, block, "per_rank:4")
    with pytest.raises(CheckpointError, match="per_rank:4 .*blocks lack"):
        wrong.get(P + "v_proj.weight")
    grid = kv_reader(tmp_path / "grid", quantized, dk, dv, block, "grid")
    with pytest.raises(CheckpointError, match="--fp8-kv-layout grid does not fit the shapes"):
        grid.get(P + "k_proj.weight")
    with pytest.raises(CheckpointError, match="unknown FP8 K/V layout 'diagonal'"):
        kv_reader(tmp_path / "bad", quantized, dk, dv, block, "diagonal")


def test_other_tensors_with_a_single_fitting_layout_are_not_read(tmp_path, monkeypatch):
    from mimo_v2_flash.checkpoint.fp8_quantization import quantize_blockwise

    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    q, s = quantize_blockwise(torch.randn(256, 96), (128, 32))
    save_file({name: q, name + "_scale_inv": s}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"hidden_size": 96, "num_attention_heads": 1, "quantization_config": {"weight_block_size": [128, 32]}}
        )
    )
    reader = FP8Checkpoint(HFCheckpoint(tmp_path))
    read: list[str] = []
    original = HFCheckpoint.get
    monkeypatch.setattr(HFCheckpoint, "get", lambda self, n, *a: read.append(n) or original(self, n, *a))
    assert reader.layout(name).kind == "grid"
    assert read == []


@pytest.mark.parametrize("layout", ["fused_kv_split", "per_rank:2"])
@pytest.mark.parametrize("heads", [2, 4])
def test_small_models_import_exactly_where_only_head_cutting_slices_also_fit(tmp_path, layout, heads):
    """Hidden 256 (two column blocks), 2 KV heads on full layers and 4 on SWA layers: per_rank:4 on a 2-head K gives
    the same scale shape as fused_kv_split but would cut each 192-row head in half, which no TP export does."""
    dk, dv, block = 192, 128, (128, 128)
    quantized = fp8_reference.quantize(*random_kv(heads, dk, dv, 256, seed=heads), heads, block, layout)
    reader = kv_reader(tmp_path, quantized, dk, dv, block)
    want_k, want_v = fp8_reference.dequantize(*quantized, heads, block, layout)
    assert torch.equal(reader.get(P + "k_proj.weight"), want_k)
    assert torch.equal(reader.get(P + "v_proj.weight"), want_v)
    assert layout in (reader.layout(P + "k_proj.weight").kind, *reader.layout(P + "k_proj.weight").aliases)
