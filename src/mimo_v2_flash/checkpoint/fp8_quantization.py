"""Block-wise amax FP8 quantization in any scale layout: the one quantizer of the FP8 export and the tiny checkpoints.

A layout is a map from each weight row to a row of its scale sources (see :mod:`fp8_scale_layouts`). Every block
(the rows sharing a scale row, within one column block) is scaled so that its largest magnitude lands on the FP8
maximum: ``scale_inv = amax / 448``, ``fp8 = round(value / scale_inv)``.

Why an untouched weight comes back bit for bit: its values are ``q * s`` rounded once (to bf16 or fp32), with
``|q| = 448`` somewhere in each block. Rounding is monotonic, so that element is again the block's amax, the new
scale is ``s`` within one rounding (2^-9 relative in bf16), and ``value / scale`` lands within ~2^-8 relative of
``q``, far inside half an FP8 step (>= 2^-5 relative; subnormals: 2^-10 absolute against an error <= 2^-14),
so every element rounds back to ``q``.
"""

from __future__ import annotations

import math

import torch

from mimo_v2_flash.checkpoint.fp8_scale_layouts import (
    FP8_DTYPE,
    FP8_MAX,
    fused_rows,
    grid_rows,
    parse_kv_layout,
    per_rank_rows,
    rank_fused_rows,
    shadowed_v_rows,
)

ROW_CHUNK = 1024  # rows quantized at a time: bounds the fp32 temporaries of a large weight
MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero block gets a tiny positive scale instead of 0 (no 0 / 0)


def quantize_rows(
    weights: dict[str, torch.Tensor],
    row_maps: dict[str, torch.Tensor],
    scale_rows: int,
    col_block: int,
    shadowed: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Quantize weights that share scale sources: ``(fp8 weight per name, fp32 scales [scale_rows, col blocks])``.

    Args:
        weights: 2-D weights with the same column count (e.g. a layer's K and V projections).
        row_maps: Per weight, the scale row each of its rows uses (rows of the concatenated scale sources).
        scale_rows: Rows of the concatenated scales.
        col_block: Column block size.
        shadowed: ``(source row, copy row)`` pairs: scale rows no weight row uses that store a copy of another.
    """
    cols = next(iter(weights.values())).shape[1]
    col_blocks = math.ceil(cols / col_block)
    amax = torch.zeros(scale_rows, col_blocks)
    for name, weight in weights.items():
        if weight.dim() != 2 or weight.shape[1] != cols or row_maps[name].numel() != weight.shape[0]:
            raise ValueError(f"{name}: shape {tuple(weight.shape)} does not fit its scale layout")
        index = row_maps[name][:, None].expand(-1, col_blocks)
        for start in range(0, weight.shape[0], ROW_CHUNK):
            blocks = _column_blocks(weight[start : start + ROW_CHUNK], col_block)
            amax.scatter_reduce_(0, index[start : start + ROW_CHUNK], blocks.abs().amax(-1), reduce="amax")
        if not torch.isfinite(amax).all():
            raise ValueError(f"{name}: holds NaN or infinite values, which FP8 cannot store")
    scales = (amax / FP8_MAX).clamp_(min=MIN_SCALE)
    for source, copy in shadowed:
        scales[copy] = scales[source]
    quantized = {}
    for name, weight in weights.items():
        out = torch.empty(weight.shape, dtype=FP8_DTYPE)
        for start in range(0, weight.shape[0], ROW_CHUNK):
            blocks = _column_blocks(weight[start : start + ROW_CHUNK], col_block)
            blocks.div_(scales[row_maps[name][start : start + ROW_CHUNK]][:, :, None]).clamp_(-FP8_MAX, FP8_MAX)
            out[start : start + ROW_CHUNK] = blocks.view(blocks.shape[0], -1)[:, :cols].to(FP8_DTYPE)
        quantized[name] = out
    return quantized, scales


def _column_blocks(rows: torch.Tensor, col_block: int) -> torch.Tensor:
    """``rows`` as a new fp32 tensor ``[rows, column blocks, col_block]`` (the last block zero-padded)."""
    values = rows.float() if rows.dtype != torch.float32 else rows.clone()
    padding = -values.shape[1] % col_block
    if padding:
        values = torch.nn.functional.pad(values, (0, padding))
    return values.view(values.shape[0], -1, col_block)


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax-scaled block FP8 quantization on the plain grid: (fp8 weight, fp32 ``scale_inv``)."""
    rows = weight.shape[0]
    quantized, scales = quantize_rows(
        {"w": weight}, {"w": grid_rows(rows, block[0])}, math.ceil(rows / block[0]), block[1]
    )
    return quantized["w"], scales


def kv_row_maps(
    layout: str, heads: int, dk: int, dv: int, bm: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, list[tuple[int, int]]]:
    """K and V row maps into ``[k_scale; v_scale]`` of a named layout, the scale rows of each, and shadowed rows."""
    layout = parse_kv_layout(layout)
    k_rows, v_rows = heads * dk, heads * dv
    if layout == "grid":
        layout = "per_rank:1"
    if layout.startswith("per_rank:"):
        ranks = int(layout.split(":")[1])
        sk, sv = ranks * math.ceil(k_rows // ranks / bm), ranks * math.ceil(v_rows // ranks / bm)
        return per_rank_rows(k_rows, ranks, bm), per_rank_rows(v_rows, ranks, bm) + sk, sk, sv, []
    if layout.startswith("rank_fused:"):
        k_map, v_map, sk, sv, padding = rank_fused_rows(heads, dk, dv, bm, int(layout.split(":")[1]))
        return k_map, v_map, sk, sv, [(k, sk + v) for k, v in padding]
    if layout == "auto":
        raise ValueError("an explicit K/V layout is needed to quantize")
    split = layout == "fused_kv_split"
    k_map, v_map, sk, sv = fused_rows(heads, dk, dv, bm, split)
    return k_map, v_map, sk, sv, [] if split else [(k, sk + v) for k, v in shadowed_v_rows(heads, dk, dv, bm)]


def quantize_kv(
    k: torch.Tensor, v: torch.Tensor, heads: int, block: tuple[int, int], layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V projections of one layer in ``layout`` (``grid``, ``per_rank:T``, ``fused_kv``,
    ``fused_kv_split``, ``rank_fused:T``): ``(fp8 K, K scale_inv, fp8 V, V scale_inv)``."""
    k_map, v_map, sk, sv, shadowed = kv_row_maps(layout, heads, k.shape[0] // heads, v.shape[0] // heads, block[0])
    quantized, scales = quantize_rows({"k": k, "v": v}, {"k": k_map, "v": v_map}, sk + sv, block[1], shadowed)
    return quantized["k"], scales[:sk], quantized["v"], scales[sk:]
