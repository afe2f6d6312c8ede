"""Which scale row each row of a block-FP8 weight uses: the candidate layouts, and the data that decides.

With ``bm`` the row block size, ``dk`` / ``dv`` the K / V head dims of a layer and ``h`` a KV head:

* ``grid``: rows cut into ``bm`` blocks from row 0 (``ceil(rows / bm)`` scale rows).
* ``per_rank:T``: the rows cut into ``T`` equal tensor-parallel slices, each on its own grid (padded per slice),
  as checkpoints exported per rank are. ``T`` is not stored: every ``T`` that gives the stored scale rows counts.
* ``fused_kv``: each head's ``[K_h; V_h]`` quantized as one matrix; K keeps ``ceil(dk / bm)`` scale rows, V the
  blocks ``dk // bm`` to ``(dk + dv - 1) // bm``, so a block shared by the end of K and the start of V is stored
  twice (``k_scale[...] == v_scale[...]``).
* ``fused_kv_split``: the same quantization, but V keeps only the blocks no K row touches
  (``ceil((dk + dv) / bm) - ceil(dk / bm)`` per head); V rows in K's last block use K's scale row.
* ``rank_fused:T``: the general form of the three above, and what a tensor-parallel export writes: the KV heads
  cut into ``T`` rank slices, each rank's ``[K_r; V_r]`` quantized on one grid (its Q rows, whole blocks, before
  them), the scale rows then split by projection (a block goes to the projection it starts in); V keeps
  ``ceil(V_r / bm)`` rows per rank, the size a serving loader's V slot has, and a row no V block starts in repeats
  K's last block. One KV head per rank is ``fused_kv_split``; K and V slices of whole blocks are ``per_rank:T``.

A layout is a map from weight rows to rows of its scale sources (the K/V layouts index ``[k_scale; v_scale]``).
Block-wise amax quantization puts an FP8 value of magnitude 448 in every (row block, column block) of the true
layout, so a candidate is kept only if every block it defines holds one (an all-zero block says nothing).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


# Row maps are shared, never modified: the release has ~37k expert weights of two shapes, and a map per weight
# would hold ~0.8 GB.
@functools.cache
def grid_rows(rows: int, bm: int) -> torch.Tensor:
    return torch.arange(rows) // bm


@functools.cache
def per_rank_rows(rows: int, ranks: int, bm: int) -> torch.Tensor:
    """Scale row of each weight row when ``ranks`` equal slices were each quantized on their own grid."""
    per_slice = rows // ranks
    index = torch.arange(rows)
    return (index // per_slice) * math.ceil(per_slice / bm) + (index % per_slice) // bm


def per_rank_counts(rows: int, scale_rows: int, bm: int) -> list[int]:
    """Every slice count ``T > 1`` dividing ``rows`` whose per-slice grids give ``scale_rows`` rows."""
    return [t for t in range(2, scale_rows + 1) if rows % t == 0 and t * math.ceil(rows // t / bm) == scale_rows]


def fused_rows(heads: int, dk: int, dv: int, bm: int, split: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """K and V row maps into ``[k_scale; v_scale]`` for the fused layouts, and the K / V scale rows they need.

    A V row inside K's last block maps to K's scale row for that block (the block was quantized with it). Under
    ``fused_kv`` V also stores that row itself; :func:`shadowed_v_rows` lists those copies.
    """
    k_per_head = math.ceil(dk / bm)
    v_first = k_per_head if split else dk // bm
    v_per_head = (dk + dv - 1) // bm + 1 - v_first
    k_rows = torch.cat([h * k_per_head + torch.arange(dk) // bm for h in range(heads)])
    v_maps = []
    for h in range(heads):
        block = (dk + torch.arange(dv)) // bm
        own = heads * k_per_head + h * v_per_head + block - v_first
        v_maps.append(torch.where(block < k_per_head, h * k_per_head + block, own))
    return k_rows, torch.cat(v_maps), heads * k_per_head, heads * v_per_head


def rank_fused_rows(
    heads: int, dk: int, dv: int, bm: int, ranks: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, list[tuple[int, int]]]:
    """``rank_fused:ranks``: K and V row maps into ``[k_scale; v_scale]``, the K / V scale rows they need, and the
    (K scale row, V scale row) pairs (each counted in its own scale) where a V scale row no V block starts in repeats
    K's last block of that rank."""
    if ranks <= 0 or heads % ranks:
        raise ValueError(f"rank_fused:{ranks} needs the KV heads ({heads}) to divide into {ranks} ranks")
    k_rank, v_rank = heads // ranks * dk, heads // ranks * dv
    k_per_rank, v_per_rank = math.ceil(k_rank / bm), math.ceil(v_rank / bm)
    v_used = math.ceil((k_rank + v_rank) / bm) - k_per_rank
    k_maps, v_maps, padding = [], [], []
    for rank in range(ranks):
        k_maps.append(rank * k_per_rank + torch.arange(k_rank) // bm)
        block = (k_rank + torch.arange(v_rank)) // bm
        own = ranks * k_per_rank + rank * v_per_rank + block - k_per_rank
        v_maps.append(torch.where(block < k_per_rank, rank * k_per_rank + block, own))
        last_k = rank * k_per_rank + k_per_rank - 1
        padding += [(last_k, rank * v_per_rank + row) for row in range(v_used, v_per_rank)]
    return torch.cat(k_maps), torch.cat(v_maps), ranks * k_per_rank, ranks * v_per_rank, padding


def shadowed_v_rows(heads: int, dk: int, dv: int, bm: int) -> list[tuple[int, int]]:
    """Under ``fused_kv``: (k scale row, v scale row) pairs that store one shared block's scale twice."""
    if dk % bm == 0:
        return []
    k_per_head, v_per_head = math.ceil(dk / bm), (dk + dv - 1) // bm + 1 - dk // bm
    return [(h * k_per_head + k_per_head - 1, h * v_per_head) for h in range(heads)]


@dataclass
class Candidate:
    """One way to read a tensor (or a K/V pair): row maps into the concatenated scales of ``sources``."""

    kind: str
    row_maps: dict[str, torch.Tensor]
    sources: tuple[str, ...]
    shadowed: list[tuple[int, int]] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    blocks_at_max: int = 0
    blocks: int = 0
    failure: str = ""

    @property
    def label(self) -> str:
        """The name, with the names of identical layouts (``grid = per_rank:2``)."""
        return " = ".join([self.kind, *self.aliases])

    def same_maps(self, other: Candidate) -> bool:
        return self.sources == other.sources and all(
            torch.equal(self.row_maps[n], other.row_maps[n]) for n in self.row_maps
        )


def solo_candidates(rows: int, scale_rows: int, bm: int, name: str, scale_name: str) -> list[Candidate]:
    """Layouts of a tensor quantized on its own (``grid`` and every fitting ``per_rank:T``)."""
    found = []
    if math.ceil(rows / bm) == scale_rows:
        found.append(Candidate("grid", {name: grid_rows(rows, bm)}, (scale_name,)))
    for ranks in per_rank_counts(rows, scale_rows, bm):
        found.append(Candidate(f"per_rank:{ranks}", {name: per_rank_rows(rows, ranks, bm)}, (scale_name,)))
    return found


def merge_identical(candidates: list[Candidate]) -> list[Candidate]:
    """Drop candidates whose row maps equal an earlier one's (the earlier name is kept, the others noted)."""
    kept: list[Candidate] = []
    for candidate in candidates:
        twin = next((k for k in kept if k.same_maps(candidate)), None)
        if twin is None:
            kept.append(candidate)
        else:
            twin.aliases.append(candidate.kind)
    return kept


def check_against_data(
    candidate: Candidate, fp8_rows_amax: dict[str, torch.Tensor], scales: torch.Tensor
) -> Candidate:
    """Count the blocks of ``candidate`` that hold the FP8 maximum; record why it fails, if it does.

    ``fp8_rows_amax[name]`` is ``|fp8|`` maxed over each column block, per row (``[rows, col_blocks]``);
    ``scales`` is the concatenation of the candidate's scale sources.
    """
    scale_rows, col_blocks = scales.shape
    amax = torch.zeros(scale_rows, col_blocks)
    used = torch.zeros(scale_rows, dtype=torch.bool)
    for name, row_map in candidate.row_maps.items():
        index = row_map[:, None].expand(-1, col_blocks).contiguous()  # a stride-0 index is ~100x slower
        amax.scatter_reduce_(0, index, fp8_rows_amax[name], reduce="amax")
        used[row_map] = True
    blocks = amax[used]
    candidate.blocks = blocks.numel()
    candidate.blocks_at_max = int(((blocks == FP8_MAX) | (blocks == 0)).sum())
    reasons = []
    if candidate.blocks_at_max != candidate.blocks:
        reasons.append(f"{candidate.blocks - candidate.blocks_at_max}/{candidate.blocks} blocks lack |fp8| = 448")
    for k_row, v_row in candidate.shadowed:
        if not torch.equal(scales[k_row], scales[v_row]):
            reasons.append(f"shared K|V block scales differ (scale rows {k_row} and {v_row})")
            break
    unused = int((~used).sum()) - len(candidate.shadowed)
    if unused:
        reasons.append(f"{unused} scale rows unused")
    candidate.failure = "; ".join(reasons)
    return candidate


def rows_amax(fp8: torch.Tensor, col_block: int) -> torch.Tensor:
    """``|fp8|`` per row, maxed over each column block (NaN counted as 0): ``[rows, ceil(cols / col_block)]``."""
    rows, cols = fp8.shape
    values = fp8.float().abs().nan_to_num_(0.0)
    padded = torch.zeros(rows, math.ceil(cols / col_block) * col_block)
    padded[:, :cols] = values
    return padded.view(rows, -1, col_block).amax(dim=2)


def evidence_line(candidates: list[Candidate]) -> str:
    """Per candidate: blocks holding |fp8| = 448 and, for a rejected one, why."""
    return "; ".join(
        f"{c.label} {c.blocks_at_max}/{c.blocks} blocks at 448" + (f" ({c.failure})" if c.failure else "")
        for c in candidates
    )


def effective_scales(candidate: Candidate, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: scales[row_map] for name, row_map in candidate.row_maps.items()}


class LayoutError(ValueError):
    """No layout, or several that disagree, explain a tensor's scales and data."""


def decide(
    candidates: list[Candidate],
    load: Callable[[Candidate], tuple[dict[str, torch.Tensor], torch.Tensor]],
    always_check: bool,
    recorded_kind: str | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """The one candidate the data supports, and the candidates considered (checked ones carry their evidence).

    ``load(candidate)`` returns the per-row block amax of each tensor (see :func:`rows_amax`) and the candidate's
    concatenated scales. Without ``always_check`` a single candidate is taken from the shapes alone. Several
    survivors are accepted only when they give every element the same scale, or when one of them is the layout
    the checkpoint's writer recorded (``recorded_kind``): the record chooses among what the data allows, never
    against it.
    """
    candidates = merge_identical(candidates)
    if not candidates:
        raise LayoutError("no layout fits the shapes")
    if len(candidates) == 1 and not always_check and not candidates[0].shadowed:
        return candidates[0], candidates
    for candidate in candidates:
        check_against_data(candidate, *load(candidate))
    survivors = [c for c in candidates if not c.failure]
    if not survivors:
        raise LayoutError(f"every candidate contradicts the data: {evidence_line(candidates)}")
    first = effective_scales(survivors[0], load(survivors[0])[1])
    for other in survivors[1:]:
        scales = effective_scales(other, load(other)[1])
        if not all(torch.equal(first[n], scales[n]) for n in first):
            recorded = next((c for c in survivors if recorded_kind in (c.kind, *c.aliases)), None)
            if recorded is not None:
                return recorded, candidates
            raise LayoutError(f"ambiguous, several layouts fit the data: {evidence_line(candidates)}")
    return survivors[0], candidates
