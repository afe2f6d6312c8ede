"""Exact block-wise FP8 (``float8_e4m3fn`` + ``<name>_scale_inv``) dequantization for MiMo-V2-Flash checkpoints.

``value = fp8.float() * scale_inv[block]`` in fp32, cast once to the target dtype. Which scale a weight row uses
depends on how the checkpoint was quantized: ``grid``, ``per_rank:T``, ``fused_kv`` or ``fused_kv_split`` (see
:mod:`fp8_scale_layouts`). The layout is decided per tensor: the shapes give the candidates, the data decides
(amax scaling puts |fp8| = 448 in every block of the true layout). K and V projections are always decided
together, from both tensors' data, so a V projection is never read by its shapes alone. A layout nothing
explains, or that several explain differently, is a one-line error naming the tensor and its shapes; block sizes
are never guessed from ``rows // scale_rows``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mimo_v2_flash.checkpoint.fp8_scale_layouts import (
    FP8_DTYPE,
    FP8_MAX,
    Candidate,
    LayoutError,
    decide,
    evidence_line,
    fused_rows,
    grid_rows,
    per_rank_rows,
    rank_fused_rows,
    rows_amax,
    shadowed_v_rows,
    solo_candidates,
)
from mimo_v2_flash.checkpoint.fused_qkv import FUSED_QKV_SUFFIX, FusedQKVError, chunk_source, fused_chunks
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint
from mimo_v2_flash.checkpoint.kv_layout_names import parse_kv_layout
from mimo_v2_flash.checkpoint.mxfp4 import MXFP4_BLOCK_SIZE, dequantize_mxfp4, is_mxfp4_checkpoint
from mimo_v2_flash.checkpoint.mxfp4 import SCALE_SUFFIX as MXFP4_SCALE_SUFFIX

SCALE_SUFFIX = "_scale_inv"
LAYOUT_RECORD = "fp8_layouts.json"  # the scale layout of each FP8 tensor, as the writer of a checkpoint recorded it
HALF_EXPONENT_SHIFT = 8  # float16's exponent bias 15 minus float8_e4m3fn's 7
FP8_MAX_SCALED = FP8_MAX * 2.0**-HALF_EXPONENT_SHIFT


@dataclass(frozen=True)
class ScaleLayout:
    """How the rows of one weight map to rows of its scale sources (their scale tensors, concatenated)."""

    kind: str
    row_to_scale_row: torch.Tensor
    sources: tuple[str, ...]
    evidence: str
    checked: tuple[tuple[str, int, int, str], ...] = ()  # (candidate, blocks at 448, blocks, failure)
    aliases: tuple[str, ...] = ()  # other names of the same row maps (e.g. ``per_rank:2`` for ``grid``)
    shadowed: tuple[tuple[int, int], ...] = ()  # (source row, copy row) of scale rows stored twice


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, layout: ScaleLayout, col_block: int, out: torch.Tensor
) -> torch.Tensor:
    """Exact dequantization into ``out`` (contiguous, ``weight``'s element count): fp32 product, one cast to its dtype.

    Rows sharing a scale row form runs (one per row block); each run is one broadcast multiply by that scale row
    expanded over its column blocks, so fp32 temporaries stay one block-row high.
    """
    rows, cols = weight.shape
    out = out.view(rows, cols)
    column_scales = scale.float().repeat_interleave(col_block, dim=1)[:, :cols]
    # PyTorch's float8 -> float32 cast is scalar code; the float16 route below is vectorized (about 3x faster).
    # It yields fp8 * 2**-8, so the scales absorb 2**8: a power-of-two factor, exact while the scales stay finite.
    shifted_scales = column_scales * 2.0**HALF_EXPONENT_SHIFT
    fast = bool(torch.isfinite(shifted_scales).all())
    row_map = layout.row_to_scale_row
    starts = [0, *(torch.nonzero(row_map[1:] != row_map[:-1]).flatten() + 1).tolist()]
    stops = [*starts[1:], rows]
    # One set of temporaries for all runs: allocating them per run page-faults fresh memory every time.
    run_rows = max(stop - start for start, stop in zip(starts, stops, strict=True))
    bits = torch.empty(run_rows, cols, dtype=torch.int16) if fast else None
    values = torch.empty(run_rows, cols, dtype=torch.float32)
    for start, stop in zip(starts, stops, strict=True):
        run = values[: stop - start]
        if fast and _fp8_as_scaled_float(weight[start:stop], bits[: stop - start], run):
            run_scales = shifted_scales[int(row_map[start])]
        else:
            run.copy_(weight[start:stop])
            run_scales = column_scales[int(row_map[start])]
        # The fp32 product, cast once. (``torch.mul(..., out=<bf16>)`` would allocate an fp32 temporary per run.)
        out[start:stop].copy_(run.mul_(run_scales))
    return out


def _fp8_as_scaled_float(weight: torch.Tensor, bits: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = weight.float() * 2**-8`` exactly (``bits``: int16 workspace); False if ``weight`` holds NaN.

    The fp8 bits shifted left by 7 are a float16 with the same sign, exponent field and mantissa (subnormals
    included); only the exponent bias differs. Sign extension of the int8 view puts the sign in bit 15 and also
    in bit 14, which is cleared. float8_e4m3fn has no infinities and one NaN pattern per sign (exponent and
    mantissa all ones), which lands on +-1.875, beyond the largest finite value 448 * 2**-8 = 1.75.
    """
    bits.copy_(weight.view(torch.int8)).bitwise_left_shift_(7).bitwise_and_(~0x4000)
    out.copy_(bits.view(torch.float16))
    low, high = torch.aminmax(out)
    return bool(high <= FP8_MAX_SCALED) and bool(low >= -FP8_MAX_SCALED)


def read_layout_record(directory: Path) -> dict:
    """``directory``'s :data:`LAYOUT_RECORD` (written by this project's import next to a Megatron checkpoint and by
    its FP8 export next to the shards), or ``{}``."""
    path = Path(directory) / LAYOUT_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable FP8 layout record ({error})") from None
    layouts = record.get("layouts") if isinstance(record, dict) else None
    if not isinstance(layouts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in layouts.items()):
        raise CheckpointError(f"{path}: FP8 layout record without a 'layouts' map of tensor names to layouts")
    return record


class FP8Checkpoint:
    """Dequantizing view of an :class:`HFCheckpoint`: weights come out in a float dtype, scales are hidden."""

    def __init__(self, checkpoint: HFCheckpoint, kv_layout: str = "auto") -> None:
        """``kv_layout``: ``auto`` (decide each K/V pair from its data) or a layout every K/V pair must have."""
        self.checkpoint = checkpoint
        quant = checkpoint.config.get("quantization_config") or {}
        self.block = tuple(quant["weight_block_size"]) if quant.get("weight_block_size") else None
        self.mxfp4 = is_mxfp4_checkpoint(quant)
        try:
            self.kv_layout = parse_kv_layout(kv_layout)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        self._layouts: dict[str, ScaleLayout] = {}
        self.recorded = read_layout_record(checkpoint.directory).get("layouts", {})
        self._check_pairs()

    @property
    def is_fp8(self) -> bool:
        return any(self.checkpoint.dtype(n) == FP8_DTYPE for n in self.checkpoint.keys())

    def is_mxfp4(self, name: str) -> bool:
        """Whether ``name`` is an MXFP4 weight (``uint8`` E2M1 pairs with an E8M0 ``<name>_scale``)."""
        return (
            self.checkpoint.dtype(name) == torch.uint8
            and name + MXFP4_SCALE_SUFFIX in self.checkpoint
            and self.checkpoint.dtype(name + MXFP4_SCALE_SUFFIX) == torch.uint8
        )

    def is_quantized(self, name: str) -> bool:
        """Whether :meth:`get` decodes ``name`` (block FP8 or MXFP4) rather than reading it as stored."""
        return self.checkpoint.dtype(name) == FP8_DTYPE or self.is_mxfp4(name)

    def logical_shape(self, name: str) -> tuple[int, ...]:
        """The shape :meth:`get` returns (an MXFP4 weight holds two columns per byte)."""
        shape = self.checkpoint.shape(name)
        return (*shape[:-1], 2 * shape[-1]) if self.is_mxfp4(name) else shape

    def _check_mxfp4(self, name: str) -> None:
        path = self.checkpoint.file_of(name)
        if not self.mxfp4:
            raise CheckpointError(
                f"{path}: uint8 weight {name} with a {MXFP4_SCALE_SUFFIX} but quantization_config does not declare "
                "store_dtype 'mxfp4'"
            )
        shape, scale_shape = self.checkpoint.shape(name), self.checkpoint.shape(name + MXFP4_SCALE_SUFFIX)
        if len(shape) != 2 or scale_shape != (shape[0], 2 * shape[1] // MXFP4_BLOCK_SIZE) or shape[1] % 16:
            raise CheckpointError(
                f"{path}: MXFP4 weight {name} {shape} and its scale {scale_shape} do not fit (packed [R, C/2] "
                f"needs scales [R, C/{MXFP4_BLOCK_SIZE}])"
            )

    def _check_pairs(self) -> None:
        names = set(self.checkpoint.keys())
        for name in sorted(names):
            if self.is_mxfp4(name):
                self._check_mxfp4(name)
            elif name.endswith(MXFP4_SCALE_SUFFIX) and self.is_mxfp4(name[: -len(MXFP4_SCALE_SUFFIX)]):
                continue
            elif name.endswith(SCALE_SUFFIX):
                if name[: -len(SCALE_SUFFIX)] not in names:
                    raise CheckpointError(f"{self.checkpoint.file_of(name)}: scale {name} has no weight")
            elif self.checkpoint.dtype(name) == FP8_DTYPE:
                if name + SCALE_SUFFIX not in names:
                    raise CheckpointError(f"{self.checkpoint.file_of(name)}: FP8 weight {name} has no {SCALE_SUFFIX}")
                if self.block is None:
                    raise CheckpointError(
                        f"{self.checkpoint.directory / 'config.json'}: FP8 weights (e.g. {name}) but no "
                        "quantization_config.weight_block_size"
                    )
                if len(self.checkpoint.shape(name)) != 2:
                    raise CheckpointError(f"{self.checkpoint.file_of(name)}: FP8 weight {name} is not 2-D")

    def weight_names(self) -> list[str]:
        """Every tensor but the FP8 and MXFP4 scales."""
        return [
            n
            for n in self.checkpoint.keys()
            if not n.endswith(SCALE_SUFFIX)
            and not (n.endswith(MXFP4_SCALE_SUFFIX) and self.is_mxfp4(n[: -len(MXFP4_SCALE_SUFFIX)]))
        ]

    def result_dtype(self, name: str, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype :meth:`get` returns for ``name``: ``dtype`` if given, else fp32 for FP8, else as stored."""
        if dtype is not None:
            return dtype
        return torch.float32 if self.is_quantized(name) else self.checkpoint.dtype(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, dequantized exactly if FP8, in :meth:`result_dtype`."""
        result, stored = self.result_dtype(name, dtype), self.checkpoint.dtype(name)
        tensor = self.checkpoint.get(name)
        if self.is_mxfp4(name):
            return dequantize_mxfp4(tensor, self.checkpoint.get(name + MXFP4_SCALE_SUFFIX), result)
        if stored != FP8_DTYPE:
            return tensor if stored == result else tensor.to(result)
        layout = self.layout(name)
        scale = torch.cat([self.checkpoint.get(source) for source in layout.sources])
        return dequantize(tensor, scale, layout, self.block[1], torch.empty(tuple(tensor.shape), dtype=result))

    def layout(self, name: str) -> ScaleLayout:
        """The scale layout of FP8 weight ``name`` (a K/V projection is decided together with its partner)."""
        if name not in self._layouts:
            pair = self._kv_pair(name)
            self._layouts.update(self._decide_pair(*pair) if pair else self._decide_solo(name))
        return self._layouts[name]

    def resolve_all(self) -> dict[str, int]:
        """Decide the layout of every FP8 weight (errors before anything is written); tensors per layout."""
        counts: dict[str, int] = {}
        for name in self.weight_names():
            kind = "mxfp4" if self.is_mxfp4(name) else None
            if self.checkpoint.dtype(name) == FP8_DTYPE:
                kind = self.layout(name).kind
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))

    def _kv_pair(self, name: str) -> tuple[str, str] | None:
        for own, other in (("k_proj.weight", "v_proj.weight"), ("v_proj.weight", "k_proj.weight")):
            if name.endswith("self_attn." + own):
                partner = name[: -len(own)] + other
                if partner in self.checkpoint and self.checkpoint.dtype(partner) == FP8_DTYPE:
                    return (name, partner) if own.startswith("k") else (partner, name)
        return None

    def kv_head_dims(self, name: str) -> tuple[int, int]:
        """K and V head dims of the attention layer holding ``name`` (SWA layers may have their own)."""
        config = self.checkpoint.config
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        v_head_dim = int(config.get("v_head_dim") or head_dim)
        if not self.is_sliding_layer(name):
            return head_dim, v_head_dim
        return int(config.get("swa_head_dim") or head_dim), int(config.get("swa_v_head_dim") or v_head_dim)

    def is_sliding_layer(self, name: str) -> bool:
        """Whether ``name`` belongs to a sliding-window attention layer (MTP layers included)."""
        if ".mtp." in name:
            return True  # MTP layers are SWA attention blocks
        parts = name.split(".")
        if "layers" not in parts or not parts[parts.index("layers") + 1].isdigit():
            return False
        layer = int(parts[parts.index("layers") + 1])
        config = self.checkpoint.config
        pattern, types = config.get("hybrid_layer_pattern"), config.get("layer_types")
        if pattern is not None and layer < len(pattern):
            return pattern[layer] == 1
        return types is not None and layer < len(types) and types[layer] == "sliding_attention"

    def _solo(self, name: str) -> list[Candidate]:
        rows, scale_rows = self.checkpoint.shape(name)[0], self.checkpoint.shape(name + SCALE_SUFFIX)[0]
        candidates = solo_candidates(rows, scale_rows, self.block[0], name, name + SCALE_SUFFIX)
        heads = self._kv_heads(name)
        if heads is None:
            return candidates
        # A tensor-parallel export never cuts a KV head: ranks beyond the head count replicate whole heads.
        return [c for c in candidates if not c.kind.startswith("per_rank:") or heads % int(c.kind.split(":")[1]) == 0]

    def _kv_heads(self, name: str) -> int | None:
        """KV heads of a K or V projection (from its rows and head dim); None for any other tensor."""
        if not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return None
        head_dim = self.kv_head_dims(name)[0 if name.endswith("k_proj.weight") else 1]
        rows = self.checkpoint.shape(name)[0]
        return rows // head_dim if rows % head_dim == 0 else None

    def _check_columns(self, name: str) -> None:
        cols, scale_cols = self.checkpoint.shape(name)[1], self.checkpoint.shape(name + SCALE_SUFFIX)[1]
        if scale_cols != math.ceil(cols / self.block[1]):
            raise CheckpointError(
                self._unexplained(
                    (name,), f"{scale_cols} scale column blocks, expected {math.ceil(cols / self.block[1])}"
                )
            )

    def _forced(self, candidates: list[Candidate], names: tuple[str, ...]) -> list[Candidate]:
        if self.kv_layout == "auto":
            return candidates
        kept = [c for c in candidates if c.kind == self.kv_layout]
        if not kept:
            fits = ", ".join(c.kind for c in candidates) or "none"
            raise CheckpointError(
                self._unexplained(names, f"--fp8-kv-layout {self.kv_layout} does not fit the shapes (fitting: {fits})")
            )
        return kept

    def fused_chunks(self) -> int:
        """``T`` of the fused ``qkv_proj`` tensors (see :func:`fused_qkv.fused_chunks`)."""
        try:
            return fused_chunks(self.checkpoint.config, self.checkpoint.index_metadata)
        except FusedQKVError as error:
            raise CheckpointError(f"{self.checkpoint.directory}: {error}") from None

    def _decide_fused_qkv(self, name: str) -> dict[str, ScaleLayout]:
        """A fused ``qkv_proj``: each of its ``T`` chunks on its own grid (``per_rank:T``), ``T`` from the config or
        index, never from the shapes; the data must agree on every block (a contradiction is an error)."""
        self._check_columns(name)
        chunks, bm = self.fused_chunks(), self.block[0]
        rows, scale_rows = self.checkpoint.shape(name)[0], self.checkpoint.shape(name + SCALE_SUFFIX)[0]
        need = chunks * math.ceil(rows // chunks / bm)
        if rows % chunks or need != scale_rows:
            raise CheckpointError(
                self._unexplained(
                    (name,),
                    f"T={chunks} chunks (from {chunk_source(self.checkpoint.index_metadata)}), each on its own "
                    f"{bm}-row grid, need {need} scale rows",
                )
            )
        row_map = per_rank_rows(rows, chunks, bm)
        candidates = [Candidate(f"per_rank:{chunks}", {name: row_map}, (name + SCALE_SUFFIX,))]
        if chunks == 1 or torch.equal(row_map, grid_rows(rows, bm)):  # chunks of whole blocks: named as both
            candidates.append(Candidate("grid", {name: grid_rows(rows, bm)}, (name + SCALE_SUFFIX,)))
        chosen, checked = self._run_decision(candidates, (name,), always_check=True)
        return {name: self._layout_of(chosen, checked, name)}

    def _decide_solo(self, name: str) -> dict[str, ScaleLayout]:
        """A tensor quantized on its own. Only K/V projections (and tensors the plain grid cannot explain) may be
        per-rank: their candidates are checked against the data; any other tensor the grid fits is on the grid."""
        if name.endswith(FUSED_QKV_SUFFIX):
            return self._decide_fused_qkv(name)
        self._check_columns(name)
        candidates = self._solo(name)
        is_kv = name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight"))
        if is_kv:
            candidates = self._forced(candidates, (name,))
        elif candidates and candidates[0].kind == "grid":
            candidates = candidates[:1]
        chosen, checked = self._run_decision(candidates, (name,), always_check=is_kv)
        return {name: self._layout_of(chosen, checked, name)}

    def _decide_pair(self, k_name: str, v_name: str) -> dict[str, ScaleLayout]:
        for name in (k_name, v_name):
            self._check_columns(name)
        sk = self.checkpoint.shape(k_name + SCALE_SUFFIX)[0]
        sources = (k_name + SCALE_SUFFIX, v_name + SCALE_SUFFIX)
        pairs = [(k, v) for k in self._solo(k_name) for v in self._solo(v_name)]
        pairs.sort(key=lambda pair: pair[0].kind != pair[1].kind)  # one name for both first: "per_rank:2"
        candidates = [
            Candidate(
                k.kind if k.kind == v.kind else f"k:{k.kind}+v:{v.kind}",
                {k_name: k.row_maps[k_name], v_name: v.row_maps[v_name] + sk},
                sources,
            )
            for k, v in pairs
        ]
        dk, dv = self.kv_head_dims(k_name)
        (k_rows, _), (v_rows, _) = self.checkpoint.shape(k_name), self.checkpoint.shape(v_name)
        heads = k_rows // dk
        if k_rows == heads * dk and v_rows == heads * dv and heads > 0:
            bm, sv = self.block[0], self.checkpoint.shape(v_name + SCALE_SUFFIX)[0]
            for kind, split in (("fused_kv", False), ("fused_kv_split", True)):
                k_map, v_map, k_need, v_need = fused_rows(heads, dk, dv, bm, split)
                if (k_need, v_need) == (sk, sv):
                    shadowed = [] if split else [(k, sk + v) for k, v in shadowed_v_rows(heads, dk, dv, bm)]
                    candidates.append(Candidate(kind, {k_name: k_map, v_name: v_map}, sources, shadowed))
            for ranks in (t for t in range(1, heads + 1) if heads % t == 0):
                k_map, v_map, k_need, v_need, padding = rank_fused_rows(heads, dk, dv, bm, ranks)
                if (k_need, v_need) == (sk, sv):
                    shadowed = [(k, sk + v) for k, v in padding]
                    candidates.append(
                        Candidate(f"rank_fused:{ranks}", {k_name: k_map, v_name: v_map}, sources, shadowed)
                    )
        candidates = self._forced(candidates, (k_name, v_name))
        chosen, checked = self._run_decision(candidates, (k_name, v_name), always_check=True)
        return {name: self._layout_of(chosen, checked, name) for name in (k_name, v_name)}

    def _run_decision(
        self, candidates: list[Candidate], names: tuple[str, ...], always_check: bool
    ) -> tuple[Candidate, list[Candidate]]:
        data: dict[str, torch.Tensor] = {}

        def load(candidate: Candidate) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            for name in candidate.row_maps:
                if name not in data:
                    data[name] = rows_amax(self.checkpoint.get(name), self.block[1])
            scales = torch.cat([self.checkpoint.get(source).float() for source in candidate.sources])
            return data, scales

        try:
            return decide(candidates, load, always_check, self.recorded.get(names[0]))
        except LayoutError as error:
            raise CheckpointError(self._unexplained(names, str(error))) from None

    def _layout_of(self, chosen: Candidate, checked: list[Candidate], name: str) -> ScaleLayout:
        evidence = evidence_line(checked) if any(c.blocks for c in checked) else f"only {chosen.label} fits the shapes"
        return ScaleLayout(
            chosen.kind,
            chosen.row_maps[name],
            chosen.sources,
            evidence,
            tuple((c.label, c.blocks_at_max, c.blocks, c.failure) for c in checked if c.blocks),
            tuple(chosen.aliases),
            tuple(chosen.shadowed),
        )

    def _unexplained(self, names: tuple[str, ...], why: str) -> str:
        shapes = ", ".join(
            f"{n} weight {self.checkpoint.shape(n)} scale {self.checkpoint.shape(n + SCALE_SUFFIX)}" for n in names
        )
        dims = "K/V head dims {}/{}, ".format(*self.kv_head_dims(names[0])) if "self_attn" in names[0] else ""
        return (
            f"{self.checkpoint.file_of(names[0])}: cannot explain the FP8 scale layout of {shapes} "
            f"({dims}block {self.block}): {why}"
        )
