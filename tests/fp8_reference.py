"""Reference block-FP8 quantization and dequantization of K/V projections, written from the layout descriptions
for the tests (row by row, no code shared with the package).

Each weight row is owned by one scale: ``owner(row) -> (tensor, scale row)``. A block is all rows with one owner
within one column block; quantization scales each block so its largest magnitude becomes 448, dequantization
multiplies every element by its owner's scale.

``rank_fused:T``: the KV heads cut into ``T`` rank slices; each rank's ``[K_r; V_r]`` quantized on one grid of
``bm``-row blocks, a block owned by the projection it starts in. V stores ``ceil(V_r / bm)`` scale rows per rank;
a row no V block starts in repeats that rank's last K block.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LAYOUTS = ("grid", "per_rank:2", "fused_kv", "fused_kv_split")


def owners(layout: str, which: str, heads: int, dk: int, dv: int, bm: int) -> list[tuple[str, int]]:
    """(scale tensor 'k' or 'v', scale row) owning each row of K (``which='k'``) or V."""
    rows = heads * (dk if which == "k" else dv)
    result = []
    for row in range(rows):
        if layout.startswith("rank_fused:"):
            result.append(rank_fused_owner(which, row, heads, dk, dv, bm, int(layout.split(":")[1])))
        elif layout == "grid":
            result.append((which, row // bm))
        elif layout.startswith("per_rank:"):
            ranks = int(layout.split(":")[1])
            per_slice = rows // ranks
            result.append((which, (row // per_slice) * math.ceil(per_slice / bm) + (row % per_slice) // bm))
        else:
            k_rows_per_head = math.ceil(dk / bm)
            head_dim = dk if which == "k" else dv
            head, offset = divmod(row, head_dim)
            fused_row = offset if which == "k" else dk + offset
            block = fused_row // bm
            if which == "k" or block < k_rows_per_head:
                result.append(("k", head * k_rows_per_head + block))
            else:
                first_v_block = k_rows_per_head if layout == "fused_kv_split" else dk // bm
                per_head = (dk + dv - 1) // bm + 1 - first_v_block
                result.append(("v", head * per_head + block - first_v_block))
    return result


def rank_fused_owner(which: str, row: int, heads: int, dk: int, dv: int, bm: int, ranks: int) -> tuple[str, int]:
    """Owner of one K or V row under ``rank_fused:ranks``."""
    k_rank, v_rank = heads // ranks * dk, heads // ranks * dv
    k_per_rank, v_per_rank = math.ceil(k_rank / bm), math.ceil(v_rank / bm)
    if which == "k":
        rank, offset = divmod(row, k_rank)
        return "k", rank * k_per_rank + offset // bm
    rank, offset = divmod(row, v_rank)
    block = (k_rank + offset) // bm  # the rank's fused row block
    if block < k_per_rank:
        return "k", rank * k_per_rank + block
    return "v", rank * v_per_rank + block - k_per_rank


def rank_fused_padding(heads: int, dk: int, dv: int, bm: int, ranks: int) -> list[tuple[int, int]]:
    """``rank_fused:ranks``: (K scale row, V scale row) pairs where a V row no V block starts in repeats K's last
    block of the rank."""
    k_rank, v_rank = heads // ranks * dk, heads // ranks * dv
    k_per_rank, v_per_rank = math.ceil(k_rank / bm), math.ceil(v_rank / bm)
    v_used = math.ceil((k_rank + v_rank) / bm) - k_per_rank
    return [
        (rank * k_per_rank + k_per_rank - 1, rank * v_per_rank + slot)
        for rank in range(ranks)
        for slot in range(v_used, v_per_rank)
    ]


def scale_rows(layout: str, which: str, heads: int, dk: int, dv: int, bm: int) -> int:
    """Rows of the stored scale tensor ('k' or 'v')."""
    if layout.startswith("rank_fused:"):
        ranks = int(layout.split(":")[1])
        return ranks * math.ceil(heads // ranks * (dk if which == "k" else dv) / bm)
    if layout == "fused_kv" and which == "v":
        return heads * ((dk + dv - 1) // bm + 1 - dk // bm)  # the shared block is stored by V too
    return 1 + max(r for t, r in owners(layout, which, heads, dk, dv, bm) if t == which)


def quantize(k: torch.Tensor, v: torch.Tensor, heads: int, block: tuple[int, int], layout: str):
    """``(fp8 K, K scale_inv, fp8 V, V scale_inv)`` of ``layout``."""
    bm, bn = block
    dk, dv = k.shape[0] // heads, v.shape[0] // heads
    cols = k.shape[1]
    tensors = {"k": k.float(), "v": v.float()}
    own = {w: owners(layout, w, heads, dk, dv, bm) for w in "kv"}
    scales = {w: torch.zeros(scale_rows(layout, w, heads, dk, dv, bm), math.ceil(cols / bn)) for w in "kv"}
    for which in "kv":
        for row, (target, scale_row) in enumerate(own[which]):
            for col_block in range(scales["k"].shape[1]):
                amax = tensors[which][row, col_block * bn : (col_block + 1) * bn].abs().max().item()
                current = scales[target][scale_row, col_block].item()
                scales[target][scale_row, col_block] = max(current, amax / FP8_MAX)
    for table in scales.values():
        table.clamp_(min=1e-12 / FP8_MAX)
    if layout == "fused_kv" and dk % bm:  # V stores the shared block's scale as its own first row per head
        per_head = scales["v"].shape[0] // heads
        for head in range(heads):
            scales["v"][head * per_head] = scales["k"][head * math.ceil(dk / bm) + math.ceil(dk / bm) - 1]
    if layout.startswith("rank_fused:"):
        for k_row, v_row in rank_fused_padding(heads, dk, dv, bm, int(layout.split(":")[1])):
            scales["v"][v_row] = scales["k"][k_row]
    quantized = {}
    for which in "kv":
        rows = [
            (tensors[which][row] / scales[t][r].repeat_interleave(bn)[:cols]).clamp(-FP8_MAX, FP8_MAX)
            for row, (t, r) in enumerate(own[which])
        ]
        quantized[which] = torch.stack(rows).to(FP8)
    return quantized["k"], scales["k"], quantized["v"], scales["v"]


def dequantize(qk, sk, qv, sv, heads: int, block: tuple[int, int], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 K and V, element by element: ``fp8 * owner's scale`` of its column block."""
    bm, bn = block
    dk, dv = qk.shape[0] // heads, qv.shape[0] // heads
    stored = {"k": sk, "v": sv}
    out = []
    for which, q in (("k", qk), ("v", qv)):
        rows = []
        for row, (target, scale_row) in enumerate(owners(layout, which, heads, dk, dv, bm)):
            if layout == "fused_kv" and which == "v" and target == "k":
                # fused_kv stores the shared block's scale in V too; read V's own copy (it must be equal)
                per_head = sv.shape[0] // heads
                target, scale_row = "v", (row // dv) * per_head
            per_element = stored[target][scale_row].repeat_interleave(bn)[: q.shape[1]]
            rows.append(q[row].float() * per_element)
        out.append(torch.stack(rows))
    return out[0], out[1]


def quantize_grid(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor on the plain grid: (fp8, scale_inv)."""
    bm, bn = block
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = max(weight[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].abs().max().item(), 1e-12) / FP8_MAX
    per_element = scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (weight.float() / per_element).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_grid(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    rows, cols = q.shape
    out = torch.empty(rows, cols)
    for row in range(rows):
        out[row] = q[row].float() * scale[row // bm].repeat_interleave(bn)[:cols]
    return out
