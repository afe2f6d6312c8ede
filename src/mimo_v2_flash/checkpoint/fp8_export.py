"""Export in the source checkpoint's own block-FP8 format (what ``export --dtype fp8`` and the in-memory stream use).

The plan is made from the source (``--hf-model``): every tensor the source stores as FP8 is quantized again in the
scale layout the import decided for it from the data (:class:`FP8Checkpoint`), on the source's block; every other
tensor keeps the source's dtype; ``quantization_config`` is the source's. A BF16/FP32 source gets the release's
format: the release's FP8 tensor set on 128 x 128 blocks, K/V rank-fused at ``T`` = the full layers' KV heads (the
release's tensor-parallel-4 rule), everything else bf16 (router bias fp32). ``serve_tp`` re-lays K/V so that a
vLLM / SGLang server at that attention TP reads them exactly (:mod:`fp8_serving`).

Weights arrive one at a time; a K/V pair is held until both halves are there, then quantized together with the one
quantizer (:func:`quantize_rows`), so memory holds at most one layer's K and V beyond the tensor being written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mimo_v2_flash.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX, FP8Checkpoint, read_layout_record
from mimo_v2_flash.checkpoint.fp8_quantization import kv_row_maps, quantize_rows
from mimo_v2_flash.checkpoint.fp8_scale_layouts import grid_rows
from mimo_v2_flash.checkpoint.fp8_serving import AttentionGeometry, serve_kv_layout
from mimo_v2_flash.checkpoint.fused_qkv import fuse_qkv_stream
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint
from mimo_v2_flash.checkpoint.mxfp4 import quantize_mxfp4
from mimo_v2_flash.checkpoint.mxfp4 import scale_name as mxfp4_scale_name
from mimo_v2_flash.config import FUSED_PROJECTIONS, projection_layout

RELEASE_BLOCK = (128, 128)
KEEP_FP32 = ("e_score_correction_bias",)
# Tensors the release keeps unquantized although they are 2-D projections or weights.
FP8_EXCLUDED = ("o_proj", "eh_proj", "mlp.gate.", "embed_tokens", "lm_head", "norm", "attention_sink_bias")


def is_fp8_quantized_in_release(name: str) -> bool:
    """Which hub tensors the released checkpoint stores as FP8 (2-D projections except o_proj/eh_proj/router)."""
    return name.endswith("_proj.weight") and not any(part in name for part in FP8_EXCLUDED)


def release_kv_layout(config: dict, kv_heads: int) -> str:
    """The release's K/V layout for a layer with ``kv_heads``: each rank of a TP split at the full layers' KV head
    count quantized its ``[Q_r; K_r; V_r]`` rows on its own grid (one full-layer head per rank; SWA / MTP layers with
    twice the heads hold two per rank, which fill whole 128-row blocks: the plain grid)."""
    return f"rank_fused:{math.gcd(int(config['num_key_value_heads']), kv_heads)}"


def release_quantization_config(weight_names: Iterable[str], block: tuple[int, int] = RELEASE_BLOCK) -> dict:
    """The release's ``quantization_config`` (block FP8, dynamic activations, ``o_proj`` listed as ignored)."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "ignored_layers": sorted(n[: -len(".weight")] for n in weight_names if n.endswith("o_proj.weight")),
    }


@dataclass(frozen=True)
class QuantGroup:
    """Weights quantized together: row maps into their concatenated scales, stored ``scale_rows`` each."""

    names: tuple[str, ...]
    row_maps: dict[str, torch.Tensor]
    scale_rows: tuple[int, ...]
    shadowed: tuple[tuple[int, int], ...]
    kind: str


class FP8ExportPlan:
    """How each exported tensor is written: quantized in its group's layout, or cast to its dtype."""

    def __init__(
        self,
        groups: list[QuantGroup],
        dtypes: dict[str, torch.dtype],
        block: tuple[int, int],
        quantization_config: dict,
        description: str,
        mxfp4: Iterable[str] = (),
        fused_chunks: int | None = None,
    ) -> None:
        self.groups = {name: group for group in groups for name in group.names}
        self.mxfp4 = frozenset(mxfp4)  # MXFP4 weights (V2.6-Flash experts), re-quantized as MXFP4
        self.fused_chunks = fused_chunks  # a MiMo-V2 family source: q/k/v written as its fused qkv_proj of T chunks
        self.dtypes = dtypes
        self.block = block
        self.quantization_config = quantization_config
        self.description = description

    def layout_counts(self) -> dict[str, int]:
        """FP8 tensors per scale layout."""
        counts: dict[str, int] = {}
        for group in self.groups.values():
            counts[group.kind] = counts.get(group.kind, 0) + 1
        if self.mxfp4:
            counts["mxfp4"] = len(self.mxfp4)
        return dict(sorted(counts.items()))

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self.dtypes:
            return self.dtypes[name]
        return torch.float32 if name.endswith(KEEP_FP32) else torch.bfloat16

    def quantize(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``weights`` (hub names, any float dtype, separate q/k/v) as the export writes them: FP8 weights followed
        by their ``_scale_inv``, every other tensor in its dtype; for a family source, q/k/v fused first."""
        if self.fused_chunks is not None:
            weights = fuse_qkv_stream(weights, self.fused_chunks)
        pending: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            if name in self.mxfp4:
                packed, scales = quantize_mxfp4(tensor.detach().to("cpu"))
                yield name, packed
                yield mxfp4_scale_name(name), scales
                continue
            group = self.groups.get(name)
            if group is None:
                yield name, tensor.detach().to("cpu", self.dtype_of(name))
                continue
            held = pending.setdefault(group.names, {})
            held[name] = tensor.detach().to("cpu")
            if len(held) == len(group.names):
                del pending[group.names]
                yield from self._quantize_group(group, held)
        if pending:
            waiting = next(iter(pending))
            raise CheckpointError(f"export stream ended before all of {list(waiting)} (quantized together) arrived")

    def _quantize_group(self, group: QuantGroup, held: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            quantized, scales = quantize_rows(
                {n: held[n] for n in group.names}, group.row_maps, sum(group.scale_rows), self.block[1], group.shadowed
            )
        except ValueError as error:
            raise CheckpointError(f"{error} (FP8 layout {group.kind} of the source)") from None
        start = 0
        for name, rows in zip(group.names, group.scale_rows, strict=True):
            yield name, quantized[name]
            yield name + SCALE_SUFFIX, scales[start : start + rows].clone()
            start += rows

    def scale_names(self) -> list[str]:
        return [name + SCALE_SUFFIX for name in self.groups] + [mxfp4_scale_name(name) for name in sorted(self.mxfp4)]

    def record(self) -> dict:
        """The layouts written, for the output's :data:`LAYOUT_RECORD` (what a reader of the export may consult
        where the data alone cannot choose between layouts)."""
        layouts = {name: group.kind for name, group in self.groups.items()} | dict.fromkeys(self.mxfp4, "mxfp4")
        return {"kv_layout": "auto", "layouts": dict(sorted(layouts.items()))}


def plan_fp8_export(
    source_dir: Path, kv_layout: str = "auto", serve_tp: int | None = None, record: dict | None = None
) -> FP8ExportPlan:
    """The FP8 export plan of the checkpoint in ``source_dir`` (see the module docstring).

    ``record``: the layouts the import recorded (:func:`layout_record`); the data must decide the same, and its
    forced ``--fp8-kv-layout`` applies again.
    """
    checkpoint = HFCheckpoint(source_dir)
    if record is not None:
        kv_layout = record.get("kv_layout", kv_layout)
    reader = FP8Checkpoint(checkpoint, kv_layout)
    if reader.is_fp8:
        groups = _source_groups(reader)
        if record is not None:
            _check_record(reader, record)
        dtypes = {n: checkpoint.dtype(n) for n in reader.weight_names() if not reader.is_quantized(n)}
        mxfp4 = [n for n in reader.weight_names() if reader.is_mxfp4(n)]
        block, quant = reader.block, dict(checkpoint.config["quantization_config"])
        description = "FP8 in the source's format"
    else:
        mxfp4 = []
        block, quant = RELEASE_BLOCK, release_quantization_config(reader.weight_names())
        groups = _release_groups(reader, block)
        dtypes = {n: torch.float32 if n.endswith(KEEP_FP32) else torch.bfloat16 for n in reader.weight_names()}
        description = f"FP8 in the release's format ({checkpoint.config.get('torch_dtype', 'unquantized')} source)"
    fused_chunks = _fused_chunks(reader, serve_tp)
    if serve_tp is not None:
        groups = _serving_groups(reader, groups, block, serve_tp)
        description += f", K/V laid out for TP {serve_tp} serving"
    return FP8ExportPlan(groups, dtypes, block, quant, description, mxfp4, fused_chunks)


def _fused_chunks(reader: FP8Checkpoint, serve_tp: int | None) -> int | None:
    """``T`` of a MiMo-V2 family source's fused ``qkv_proj`` (written back in that format), else None."""
    checkpoint = reader.checkpoint
    if projection_layout(checkpoint.config) != FUSED_PROJECTIONS:
        return None
    if not reader.is_fp8:
        raise CheckpointError(
            f"{checkpoint.directory}: an unquantized fused-qkv_proj checkpoint has no FP8 format to write back; "
            "export it with --dtype bf16 (separate q/k/v)"
        )
    if serve_tp is not None:
        raise CheckpointError(
            f"{checkpoint.directory}: --fp8-serve-tp lays out separate K/V; a fused qkv_proj is already quantized "
            f"per rank ({reader.fused_chunks()} chunks)"
        )
    return reader.fused_chunks()


def layout_record(reader: FP8Checkpoint, kv_layout: str) -> dict:
    """What the import writes next to the Megatron checkpoint: the flag and each FP8 tensor's decided layout."""
    return {
        "source": str(reader.checkpoint.directory),
        "kv_layout": kv_layout,
        "layouts": {
            name: reader.layout(name).kind
            for name in reader.weight_names()
            if reader.checkpoint.dtype(name) == FP8_DTYPE
        },
    }


def find_layout_record(directories: Iterable[Path]) -> dict | None:
    """The first import record found in ``directories`` (a fine-tuning output keeps it under ``pretrained/``)."""
    for directory in directories:
        record = read_layout_record(directory)
        if record:
            return record
    return None


def _check_record(reader: FP8Checkpoint, record: dict) -> None:
    for name, kind in record.get("layouts", {}).items():
        if name in reader.checkpoint and reader.checkpoint.dtype(name) == FP8_DTYPE:
            decided = reader.layout(name).kind
            if decided != kind:
                raise CheckpointError(
                    f"{reader.checkpoint.file_of(name)}: {name} was imported as FP8 layout {kind}, but this "
                    f"checkpoint's data decides {decided}: is --hf-model the checkpoint that was imported?"
                )


def _source_groups(reader: FP8Checkpoint) -> list[QuantGroup]:
    """The source's FP8 tensors, grouped as they were quantized (a K/V pair shares its scale sources)."""
    groups, done = [], set()
    for name in reader.weight_names():
        if reader.checkpoint.dtype(name) != FP8_DTYPE or name in done:
            continue
        layout = reader.layout(name)
        names = tuple(source[: -len(SCALE_SUFFIX)] for source in layout.sources)
        done.update(names)
        groups.append(
            QuantGroup(
                names,
                {n: reader.layout(n).row_to_scale_row for n in names},
                tuple(reader.checkpoint.shape(source)[0] for source in layout.sources),
                layout.shadowed,
                layout.kind,
            )
        )
    return groups


def _geometry(reader: FP8Checkpoint, k_name: str, bm: int) -> AttentionGeometry:
    dk, dv = reader.kv_head_dims(k_name)
    heads = int(reader.checkpoint.config["num_attention_heads"])
    return AttentionGeometry(heads, reader.checkpoint.shape(k_name)[0] // dk, dk, dv, bm)


def _kv_group(k_name: str, geometry: AttentionGeometry, layout: str) -> QuantGroup:
    v_name = k_name.replace("k_proj.weight", "v_proj.weight")
    k_map, v_map, sk, sv, shadowed = kv_row_maps(layout, geometry.kv_heads, geometry.dk, geometry.dv, geometry.bm)
    return QuantGroup((k_name, v_name), {k_name: k_map, v_name: v_map}, (sk, sv), tuple(shadowed), layout)


def _grid_group(name: str, rows: int, bm: int) -> QuantGroup:
    return QuantGroup((name,), {name: grid_rows(rows, bm)}, (math.ceil(rows / bm),), (), "grid")


def _release_groups(reader: FP8Checkpoint, block: tuple[int, int]) -> list[QuantGroup]:
    """The release's FP8 tensors of an unquantized checkpoint; K/V rank-fused as a TP split at the full layers' KV
    head count quantized them (SWA layers, with more KV heads, get several heads per rank)."""
    groups = []
    for name in reader.weight_names():
        if not is_fp8_quantized_in_release(name) or len(reader.checkpoint.shape(name)) != 2:
            continue
        if name.endswith("self_attn.v_proj.weight"):
            continue  # with its k_proj
        if name.endswith("self_attn.k_proj.weight"):
            geometry = _geometry(reader, name, block[0])
            groups.append(_kv_group(name, geometry, release_kv_layout(reader.checkpoint.config, geometry.kv_heads)))
        else:
            groups.append(_grid_group(name, reader.checkpoint.shape(name)[0], block[0]))
    return groups


def _serving_groups(
    reader: FP8Checkpoint, groups: list[QuantGroup], block: tuple[int, int], tp: int
) -> list[QuantGroup]:
    """``groups`` with every attention layer's K/V re-laid for a TP-``tp`` server (and Q on the grid)."""
    result = []
    for group in groups:
        first = group.names[0]
        if first.endswith("self_attn.k_proj.weight") and len(group.names) == 2:
            geometry = _geometry(reader, first, block[0])
            try:
                layout = serve_kv_layout(geometry, tp)
            except ValueError as error:
                raise CheckpointError(f"--fp8-serve-tp {tp}: {first}: {error}") from None
            result.append(_kv_group(first, geometry, layout))
        elif first.endswith("self_attn.q_proj.weight"):
            result.append(_grid_group(first, reader.checkpoint.shape(first)[0], block[0]))
        elif first.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            raise CheckpointError(f"--fp8-serve-tp {tp}: {first} is FP8 but its K/V partner is not")
        else:
            result.append(group)
    return result
