"""Block-wise amax FP8 quantization in each layout a MiMo checkpoint may use (how the tiny FP8 checkpoints are made).

Every block is scaled so that its largest magnitude lands on the FP8 maximum (448); ``scale_inv = amax / 448``.
The layouts are described in :mod:`fp8_scale_layouts`.
"""

from __future__ import annotations

import math

import torch

from mimo_v2_flash.checkpoint.fp8_scale_layouts import FP8_DTYPE, FP8_MAX, parse_kv_layout


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax-scaled block FP8 quantization on the plain grid: (fp8 weight, fp32 ``scale_inv``)."""
    bm, bn = block
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn))
    quantized = torch.empty(rows, cols, dtype=FP8_DTYPE)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float()
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (
                (tile / scale[i, j]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            )
    return quantized, scale


def quantize_per_rank(weight: torch.Tensor, ranks: int, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``ranks`` equal row slices, each quantized on its own grid, concatenated."""
    parts = [quantize_blockwise(part, block) for part in weight.chunk(ranks)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def quantize_kv(
    k: torch.Tensor, v: torch.Tensor, heads: int, block: tuple[int, int], layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V projections of one layer in ``layout`` (``grid``, ``per_rank:T``, ``fused_kv``,
    ``fused_kv_split``): ``(fp8 K, K scale_inv, fp8 V, V scale_inv)``."""
    layout = parse_kv_layout(layout)
    if layout == "grid":
        return (*quantize_blockwise(k, block), *quantize_blockwise(v, block))
    if layout.startswith("per_rank:"):
        ranks = int(layout.split(":")[1])
        return (*quantize_per_rank(k, ranks, block), *quantize_per_rank(v, ranks, block))
    if layout == "auto":
        raise ValueError("quantize_kv needs an explicit layout")
    dk, dv, bm = k.shape[0] // heads, v.shape[0] // heads, block[0]
    k_scale_rows = math.ceil(dk / bm)
    first_v_row = k_scale_rows if layout == "fused_kv_split" else dk // bm
    qk, sk, qv, sv = [], [], [], []
    for h in range(heads):
        fused = torch.cat([k[h * dk : (h + 1) * dk], v[h * dv : (h + 1) * dv]])
        q, s = quantize_blockwise(fused, block)
        qk.append(q[:dk])
        qv.append(q[dk:])
        sk.append(s[:k_scale_rows])
        sv.append(s[first_v_row:])
    return torch.cat(qk), torch.cat(sk), torch.cat(qv), torch.cat(sv)
