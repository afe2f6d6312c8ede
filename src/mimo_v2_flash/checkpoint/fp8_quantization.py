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
    per_rank_rows,
    rank_fused_rows,
    shadowed_v_rows,
)
from mimo_v2_flash.checkpoint.kv_layout_names import parse_kv_layout

ROW_CHUNK = 256  # rows quantized at a time: bounds the fp32 temporaries of a large weight
# Dtypes whose mixed arithmetic with fp32 scales computes exactly what an fp32 copy would (others are copied).
EXACTLY_PROMOTED = (torch.float32, torch.bfloat16, torch.float16)
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
    for name, weight in weights.items():
        if weight.dim() != 2 or weight.shape[1] != cols or row_maps[name].numel() != weight.shape[0]:
            raise ValueError(f"{name}: shape {tuple(weight.shape)} does not fit its scale layout")
    amax = torch.zeros(scale_rows, col_blocks)
    chunks = {name: _row_chunks(row_maps[name]) for name in weights}
    # One pass when every block lies within one chunk of one weight (a lone weight on a grid or per-rank grid):
    # its scales are final once the chunk is read. Otherwise all block maxima first, then the quantization.
    one_pass = len(weights) == 1 and not shadowed and all(c is not None for c in chunks.values())
    if not one_pass:
        for name, weight in weights.items():
            for start in range(0, weight.shape[0], ROW_CHUNK):
                _gather_amax(amax, weight, row_maps[name], start, min(start + ROW_CHUNK, weight.shape[0]), col_block)
        _check_finite(amax, weights)
        for source, copy in shadowed:
            amax[copy] = amax[source]
    bounds = {name: chunks[name] if one_pass else _fixed_chunks(weight.shape[0]) for name, weight in weights.items()}
    # One fp32 scratch for every chunk: a fresh chunk-sized tensor each time costs more in page faults than the
    # arithmetic (~8 ms against ~1.5 ms per 1024 x 4096 rows).
    scratch = torch.empty(max(stop - start for b in bounds.values() for start, stop in b), col_blocks, col_block)
    quantized = {}
    for name, weight in weights.items():
        out = torch.empty(weight.shape, dtype=FP8_DTYPE)
        for start, stop in bounds[name]:
            if one_pass:
                blocks = _gather_amax(amax, weight, row_maps[name], start, stop, col_block)
            else:
                blocks = _column_blocks(weight[start:stop], col_block)
            row_scales = (amax[row_maps[name][start:stop]] / FP8_MAX).clamp_(min=MIN_SCALE)
            # Dividing bf16 into an fp32 output promotes it exactly: the same quotients as an fp32 copy would give.
            scaled = torch.div(blocks, row_scales[:, :, None], out=scratch[: stop - start]).clamp_(-FP8_MAX, FP8_MAX)
            out[start:stop] = scaled.view(stop - start, -1)[:, :cols]
        quantized[name] = out
    if one_pass:
        _check_finite(amax, weights)
    scales = (amax / FP8_MAX).clamp_(min=MIN_SCALE)
    return quantized, scales


def _gather_amax(
    amax: torch.Tensor, weight: torch.Tensor, row_map: torch.Tensor, start: int, stop: int, col_block: int
) -> torch.Tensor:
    """Fold rows ``start:stop`` of ``weight`` into the block maxima ``amax``; returns those rows as column blocks."""
    blocks = _column_blocks(weight[start:stop], col_block)
    # amax and amin are vectorized reductions in the weight's own dtype (no |x| temporary); aminmax over a last
    # dimension runs a scalar loop, ~4x slower than both together. NaN propagates to the maxima.
    block_amax = torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg_()).float()
    index = row_map[start:stop, None].expand(-1, amax.shape[1]).contiguous()  # a stride-0 index is ~100x slower
    amax.scatter_reduce_(0, index, block_amax, reduce="amax")
    return blocks


def _check_finite(amax: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    if not torch.isfinite(amax).all():
        raise ValueError(f"{', '.join(weights)}: NaN or infinite values, which FP8 cannot store")


def _fixed_chunks(rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + ROW_CHUNK, rows)) for start in range(0, rows, ROW_CHUNK)]


def _row_chunks(row_map: torch.Tensor) -> list[tuple[int, int]] | None:
    """Row ranges of about ``ROW_CHUNK`` rows that no scale row straddles, for a non-decreasing row map (a grid or
    per-rank grid); None for any other map."""
    rows = row_map.numel()
    if rows > 1 and not bool((row_map[1:] >= row_map[:-1]).all()):
        return None
    run_starts = [*(torch.nonzero(row_map[1:] != row_map[:-1]).flatten() + 1).tolist(), rows]
    chunks, start = [], 0
    for boundary in run_starts:
        if boundary - start >= ROW_CHUNK or boundary == rows:
            chunks.append((start, boundary))
            start = boundary
    return chunks


def _column_blocks(rows: torch.Tensor, col_block: int) -> torch.Tensor:
    """``rows`` viewed as ``[rows, column blocks, col_block]``, in their dtype if fp32 arithmetic on it is exact
    (else as fp32); a copy only where the last block needs zero padding or the rows are not contiguous."""
    if rows.dtype not in EXACTLY_PROMOTED:
        rows = rows.float()
    padding = -rows.shape[1] % col_block
    if padding:
        rows = torch.nn.functional.pad(rows, (0, padding))
    return rows.contiguous().view(rows.shape[0], -1, col_block)


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
