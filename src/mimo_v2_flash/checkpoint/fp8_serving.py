"""Which block-FP8 q/k/v scales a tensor-parallel server reads, and at which TPs it reads a checkpoint exactly.

vLLM (0.33) and SGLang (0.5.23) load ``q_proj`` / ``k_proj`` / ``v_proj`` into one fused QKV parameter per TP rank
with one generic rule: each rank's scale slots are a plain grid over that rank's rows, ``ceil(rows_r / bm)`` for Q,
K and V separately, cut from the checkpoint's scales with ``narrow(start = slot_index * slot_rows)`` (K/V slot index
= the rank's KV head group when heads are replicated), silently; the block GEMM then uses fused scale row
``row // bm`` over the rank's ``[Q_r; K_r; V_r]``. A slot reaching past the stored scale rows fails loudly.

A checkpoint is read exactly at TP ``T`` when every row's scale under that rule equals the scale of its own layout.
The FP8 export can quantize K/V so that a chosen TP reads them exactly (``--fp8-serve-tp``): ``rank_fused`` at
``min(T, kv_heads)`` ranks, which needs Q rows per rank in whole blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionGeometry:
    """Row geometry of one attention layer's q/k/v projections (``bm``: FP8 row block)."""

    heads: int
    kv_heads: int
    dk: int
    dv: int
    bm: int


def kv_groups(geometry: AttentionGeometry, tp: int) -> tuple[int, int] | str:
    """(distinct KV head groups, KV heads per rank) at ``tp``, or why a server refuses ``tp``."""
    if geometry.heads % tp:
        return f"{geometry.heads} attention heads do not divide into TP {tp}"
    if tp >= geometry.kv_heads:
        if tp % geometry.kv_heads:
            return f"TP {tp} cannot replicate {geometry.kv_heads} KV heads evenly"
        return geometry.kv_heads, 1
    if geometry.kv_heads % tp:
        return f"{geometry.kv_heads} KV heads do not divide into TP {tp}"
    return tp, geometry.kv_heads // tp


def served_scale_rows(
    geometry: AttentionGeometry, tp: int, scale_rows: tuple[int, int, int]
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | str:
    """Per rank, for ``q``, ``k`` and ``v``: (weight rows it holds, row of ``[q_scale; k_scale; v_scale]`` the rule
    reads for each), or why the server fails at ``tp``."""
    groups = kv_groups(geometry, tp)
    if isinstance(groups, str):
        return groups
    _, kv_per_rank = groups
    replicas = max(1, tp // geometry.kv_heads)
    sq, sk, _ = scale_rows
    rows = {"q": geometry.heads // tp * geometry.dk, "k": kv_per_rank * geometry.dk, "v": kv_per_rank * geometry.dv}
    slots = {name: math.ceil(count / geometry.bm) for name, count in rows.items()}
    offsets = {"q": 0, "k": sq, "v": sq + sk}
    ranks = []
    for rank in range(tp):
        slot_index = {"q": rank, "k": rank // replicas, "v": rank // replicas}
        for name, stored in zip("qkv", scale_rows, strict=True):
            start = slot_index[name] * slots[name]
            if start + slots[name] > stored:
                last = start + slots[name] - 1
                return f"rank {rank}: {name}_proj scale rows {start}..{last} exceed the {stored} stored"
        fused_start = {"q": 0, "k": rows["q"], "v": rows["q"] + rows["k"]}
        served = {}
        for name in "qkv":
            fused_slot = (fused_start[name] + torch.arange(rows[name])) // geometry.bm
            which = (fused_slot >= slots["q"]).long() + (fused_slot >= slots["q"] + slots["k"]).long()
            base = torch.tensor([0, slots["q"], slots["q"] + slots["k"]])[which]
            owner_offset = torch.tensor([offsets[n] + slot_index[n] * slots[n] for n in "qkv"])[which]
            served[name] = (slot_index[name] * rows[name] + torch.arange(rows[name]), owner_offset + fused_slot - base)
        ranks.append(served)
    return ranks


def serving_tps(heads: int) -> list[int]:
    """The attention TPs worth reporting: every divisor of the head count."""
    return [tp for tp in range(1, heads + 1) if heads % tp == 0]


def reads_exactly(
    geometry: AttentionGeometry,
    tp: int,
    row_maps: dict[str, torch.Tensor],
    scales: torch.Tensor,
    scale_rows: tuple[int, int, int],
) -> bool | str:
    """Whether a TP-``tp`` server reads every q/k/v element with its own scale (``row_maps``: the checkpoint's layout,
    rows of ``scales`` = ``[q_scale; k_scale; v_scale]`` with ``scale_rows`` rows each); a string says why the
    server fails."""
    served = served_scale_rows(geometry, tp, scale_rows)
    if isinstance(served, str):
        return served
    for rank in served:
        for name, (rows, scale_rows) in rank.items():
            if not torch.equal(scales[scale_rows], scales[row_maps[name][rows]]):
                return False
    return True


def serve_kv_layout(geometry: AttentionGeometry, tp: int) -> str:
    """The K/V layout a TP-``tp`` server reads exactly (``rank_fused:R``); ValueError if the geometry has none."""
    groups = kv_groups(geometry, tp)
    if isinstance(groups, str):
        raise ValueError(groups)
    q_rows = geometry.heads // tp * geometry.dk
    if q_rows % geometry.bm:
        raise ValueError(
            f"Q rows per rank ({q_rows}) are not whole {geometry.bm}-row blocks at TP {tp}: the server's fused grid "
            "would put Q and K rows in one block"
        )
    return f"rank_fused:{groups[0]}"
