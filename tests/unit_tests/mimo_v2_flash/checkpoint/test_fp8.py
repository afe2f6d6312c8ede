"""Block FP8 dequantization: every layout exact against an independent per-element reference, layout detection
from shapes and data, and the upstream 0.6.2 formula shown wrong where ours is right."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path

import fp8_reference
import pytest
import torch
from safetensors.torch import save_file

from mimo_v2_flash.checkpoint.fp8 import FP8_DTYPE, FP8Checkpoint
from mimo_v2_flash.checkpoint.fp8_quantization import quantize_blockwise
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint


def reference_grid(q: torch.Tensor, scale: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Element by element: value[i, j] = fp8[i, j] * scale[i // bm, j // bn] (plain loops over blocks)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            out[bi * bm : (bi + 1) * bm, bj * bn : (bj + 1) * bn] = (
                q[bi * bm : (bi + 1) * bm, bj * bn : (bj + 1) * bn].float() * scale[bi, bj].item()
            )
    return out


def write_checkpoint(directory: Path, tensors: dict, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def kv_checkpoint(directory: Path, prefix: str, quantized, config: dict) -> FP8Checkpoint:
    """A checkpoint holding one layer's quantized K and V projections and their scales."""
    qk, sk, qv, sv = quantized
    tensors = {
        prefix + "k_proj.weight": qk,
        prefix + "k_proj.weight_scale_inv": sk,
        prefix + "v_proj.weight": qv,
        prefix + "v_proj.weight_scale_inv": sv,
    }
    return FP8Checkpoint(HFCheckpoint(write_checkpoint(directory, tensors, config)))


def config_for(head_dim, v_head_dim, block):
    return {
        "hidden_size": 256,
        "num_attention_heads": 2,
        "head_dim": head_dim,
        "v_head_dim": v_head_dim,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)},
    }


@pytest.mark.parametrize(
    "shape, block",
    [((256, 512), (128, 128)), ((300, 200), (128, 128)), ((2048, 4096), (128, 128)), ((33, 17), (16, 8))],
)
def test_grid_layout_is_exact_including_partial_blocks(shape, block, tmp_path):
    weight = torch.randn(shape) * 0.05
    q, s = quantize_blockwise(weight, block)
    ckpt = FP8Checkpoint(
        HFCheckpoint(
            write_checkpoint(
                tmp_path,
                {
                    "model.layers.0.mlp.experts.0.up_proj.weight": q,
                    "model.layers.0.mlp.experts.0.up_proj.weight_scale_inv": s,
                },
                config_for(192, 128, block),
            )
        )
    )
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert ckpt.layout(name).kind == "grid"
    expected = reference_grid(q, s, *block)
    assert torch.equal(ckpt.get(name, torch.float32), expected)
    assert torch.equal(ckpt.get(name, torch.bfloat16), expected.to(torch.bfloat16))


def test_stored_weights_are_read_as_stored_or_cast(tmp_path):
    gate, up, norm = torch.randn(6, 8).bfloat16(), torch.randn(3, 8).bfloat16(), torch.randn(8)
    prefix = "model.layers.1.mlp."
    tensors = {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up, "model.norm.weight": norm}
    ckpt = FP8Checkpoint(HFCheckpoint(write_checkpoint(tmp_path, tensors, config_for(192, 128, (128, 128)))))
    assert ckpt.get("model.norm.weight").dtype == torch.float32
    assert torch.equal(ckpt.get("model.norm.weight"), norm)
    assert torch.equal(ckpt.get("model.norm.weight", torch.bfloat16), norm.bfloat16())
    assert torch.equal(ckpt.get(prefix + "gate_proj.weight", torch.float32), gate.float())
    assert torch.equal(ckpt.get(prefix + "up_proj.weight"), up)


@pytest.mark.parametrize("with_nan", [False, True])
@pytest.mark.parametrize("scale_value", [1e-3, 3.0e-41, 2.0**119, 3.0e38])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_fp8_value_dequantizes_exactly(with_nan, scale_value, dtype, tmp_path):
    """All 256 bit patterns (zeros, subnormals, the maximum, NaN) and scales from subnormal to near overflow."""
    patterns = torch.arange(256, dtype=torch.uint8)
    if not with_nan:
        patterns = patterns[(patterns & 0x7F) != 0x7F]
    rows = patterns.repeat(4)[: 16 * (4 * patterns.numel() // 16)].view(-1, 16)
    q = rows.view(FP8_DTYPE)
    s = torch.full((math.ceil(q.shape[0] / 8), 2), scale_value)
    s[0, 1] = -scale_value / 3  # a second, non-power-of-two scale in every column of blocks
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    ckpt = FP8Checkpoint(
        HFCheckpoint(write_checkpoint(tmp_path, {name: q, name + "_scale_inv": s}, config_for(192, 128, (8, 8))))
    )
    expected = reference_grid(q, s, 8, 8).to(dtype)
    got = ckpt.get(name, dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    same = (got.view(bits) == expected.view(bits)) | (torch.isnan(got) & torch.isnan(expected))
    assert bool(same.all())  # bit for bit, signed zeros included; NaN where the reference has NaN
    assert bool(torch.isnan(got).any()) == with_nan


def _upstream_dequant():
    """Upstream megatron-bridge 0.6.2's ``_dequant_fp8_blockwise``, extracted from the installed wheel's source."""
    spec = importlib.util.find_spec("megatron.bridge")
    path = Path(spec.origin).parent / "models/mimo_v2_flash/mimo_v2_flash_bridge.py"
    tree = ast.parse(path.read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_dequant_fp8_blockwise")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_dequant_fp8_blockwise"]


@pytest.mark.parametrize("layout", ["fused_kv", "fused_kv_split"])
def test_upstream_dequant_is_wrong_on_the_fused_layouts_and_ours_is_right(layout, tmp_path):
    upstream = _upstream_dequant()
    kv_heads, block = 4, (128, 128)
    generator = torch.Generator().manual_seed(3)
    k, v = (
        torch.randn(kv_heads * 192, 512, generator=generator),
        torch.randn(kv_heads * 128, 512, generator=generator) * 5,
    )
    qk, sk, qv, sv = fp8_reference.quantize(k, v, kv_heads, block, layout)
    want_k, want_v = fp8_reference.dequantize(qk, sk, qv, sv, kv_heads, block, layout)
    upstream_k = upstream(qk, sk).float()  # 768 rows // 8 scale rows -> 96-row blocks
    assert (upstream_k - want_k.to(torch.bfloat16).float()).abs().max() > 1e-2
    if layout == "fused_kv_split":  # V [512, 512] with scale [4, 4]: 128-row blocks, K's scale ignored
        assert (upstream(qv, sv).float() - want_v.to(torch.bfloat16).float()).abs().max() > 1e-2
    p = "model.layers.0.self_attn."
    ours = kv_checkpoint(tmp_path, p, (qk, sk, qv, sv), config_for(192, 128, block))
    assert torch.equal(ours.get(p + "k_proj.weight", torch.bfloat16), want_k.to(torch.bfloat16))
    assert torch.equal(ours.get(p + "v_proj.weight", torch.bfloat16), want_v.to(torch.bfloat16))


def test_upstream_dequant_is_wrong_or_fails_on_partial_blocks():
    q, s = quantize_blockwise(torch.randn(300, 200), (128, 128))
    upstream = _upstream_dequant()(q, s).float()  # 300 // 3 = 100-row blocks instead of 128
    assert (upstream - reference_grid(q, s, 128, 128).to(torch.bfloat16).float()).abs().max() > 1e-2
    q, s = quantize_blockwise(torch.randn(129, 256), (128, 128))
    with pytest.raises(RuntimeError):
        _upstream_dequant()(q, s)


def test_unexplained_layout_is_an_error_naming_tensor_and_shapes(tmp_path):
    q, _ = quantize_blockwise(torch.randn(256, 256), (128, 128))
    name = "model.layers.0.mlp.down_proj.weight"
    ckpt = FP8Checkpoint(
        HFCheckpoint(
            write_checkpoint(
                tmp_path, {name: q, name + "_scale_inv": torch.ones(3, 2)}, config_for(192, 128, (128, 128))
            )
        )
    )
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*\(256, 256\).*\(3, 2\)"):
        ckpt.get(name)


def test_fp8_weight_without_scale_and_scale_without_weight(tmp_path):
    q, s = quantize_blockwise(torch.randn(32, 32), (16, 16))
    cfg = config_for(192, 128, (16, 16))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight has no _scale_inv"):
        FP8Checkpoint(HFCheckpoint(write_checkpoint(tmp_path / "a", {"m.up_proj.weight": q}, cfg)))
    with pytest.raises(CheckpointError, match=r"scale m\.up_proj\.weight_scale_inv has no weight"):
        FP8Checkpoint(HFCheckpoint(write_checkpoint(tmp_path / "b", {"m.up_proj.weight_scale_inv": s}, cfg)))
    assert q.dtype == FP8_DTYPE
