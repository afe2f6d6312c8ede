"""The MiMo-V2 family's fused, pre-sharded ``self_attn.qkv_proj`` (MiMo-V2.5, V2.5-Pro, V2.6-Flash).

The fused weight's rows are ``T`` equal chunks, chunk ``c = [Q_c; K_c; V_c]``: the query, key and value heads of
rank ``c`` of a ``T``-way tensor-parallel split (``heads / T`` query heads, ``kv_heads / T`` KV heads of the
layer). In FP8 checkpoints each chunk was quantized on its own row grid (padded per chunk), which is the
``per_rank:T`` row map over the fused tensor. ``T`` is ``metadata.tp_size`` of the index where present, else
the config's ``num_key_value_heads``; it is never read from shapes, because SWA chunks of whole blocks have
the same scale shape for every ``T`` while their Q/K/V row order differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

FUSED_QKV_SUFFIX = "self_attn.qkv_proj.weight"


class FusedQKVError(ValueError):
    """A fused ``qkv_proj`` whose chunk count or shape does not fit the config."""


def fused_chunks(config: Mapping[str, Any], index_metadata: Mapping[str, Any] | None = None) -> int:
    """The chunk count ``T`` of a fused checkpoint: the index's ``tp_size``, else ``num_key_value_heads``.

    Raises:
        FusedQKVError: When ``T`` is not a positive integer or does not divide the query heads or the KV heads
            of every layer kind (a chunk holds whole heads).
    """
    tp_size = (index_metadata or {}).get("tp_size")
    source = chunk_source(index_metadata)
    chunks = tp_size if tp_size is not None else config.get("num_key_value_heads")
    try:
        chunks = int(chunks)
    except (TypeError, ValueError):
        raise FusedQKVError(f"fused qkv_proj: {source}={chunks!r} is not a chunk count") from None
    heads = int(config["num_attention_heads"])
    kv_counts = {int(config["num_key_value_heads"]), int(config.get("swa_num_key_value_heads") or 0)} - {0}
    if chunks < 1 or heads % chunks or any(kv % chunks for kv in kv_counts):
        raise FusedQKVError(
            f"fused qkv_proj: {source}={chunks} chunks do not split {heads} query heads and KV heads "
            f"{sorted(kv_counts)} into whole heads per chunk"
        )
    return chunks


def chunk_source(index_metadata: Mapping[str, Any] | None) -> str:
    """Where :func:`fused_chunks` takes ``T`` from, for messages."""
    return "index metadata.tp_size" if (index_metadata or {}).get("tp_size") is not None else "num_key_value_heads"


def chunk_rows(heads: int, kv_heads: int, dk: int, dv: int, chunks: int) -> tuple[int, int, int]:
    """Rows of Q, K and V in one chunk."""
    return heads // chunks * dk, kv_heads // chunks * dk, kv_heads // chunks * dv


def split_fused_qkv(
    fused: torch.Tensor, chunks: int, heads: int, kv_heads: int, dk: int, dv: int, name: str = "qkv_proj"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """De-interleave ``T`` chunks ``[Q_c; K_c; V_c]`` into separate ``q``, ``k``, ``v`` (rank order kept).

    Raises:
        FusedQKVError: When the rows do not equal ``T`` chunks of the layer's geometry.
    """
    q_rows, k_rows, v_rows = chunk_rows(heads, kv_heads, dk, dv, chunks)
    expected = chunks * (q_rows + k_rows + v_rows)
    if fused.shape[0] != expected:
        raise FusedQKVError(
            f"{name}: {tuple(fused.shape)} has {fused.shape[0]} rows, {chunks} chunks of {heads} query / {kv_heads} "
            f"KV heads (dims {dk}/{dv}) need {expected}"
        )
    per_chunk = fused.reshape(chunks, q_rows + k_rows + v_rows, *fused.shape[1:])
    q, k, v = torch.split(per_chunk, [q_rows, k_rows, v_rows], dim=1)
    width = fused.shape[1:]
    return q.reshape(-1, *width), k.reshape(-1, *width), v.reshape(-1, *width)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int) -> torch.Tensor:
    """Inverse of :func:`split_fused_qkv`: rank ``c``'s rows of ``q``, ``k``, ``v`` form chunk ``c``."""
    parts = [t.reshape(chunks, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def fuse_qkv_stream(weights: Iterable[tuple[str, torch.Tensor]], chunks: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with every attention block's ``q_proj``/``k_proj``/``v_proj`` replaced by its fused
    ``qkv_proj`` of ``chunks`` chunks (held until the block's three have arrived; an export yields them together).

    Raises:
        FusedQKVError: When the stream ends with a block incomplete.
    """
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        part = next((p for p in "qkv" if name.endswith(f"self_attn.{p}_proj.weight")), None)
        if part is None:
            yield name, tensor
            continue
        prefix = name[: -len(f"{part}_proj.weight")]
        parts = held.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == 3:
            del held[prefix]
            yield prefix + "qkv_proj.weight", fuse_qkv(parts["q"], parts["k"], parts["v"], chunks)
    if held:
        prefix, parts = next(iter(held.items()))
        raise FusedQKVError(f"{prefix}qkv_proj.weight: export stream ended with only {sorted(parts)} of q/k/v")
