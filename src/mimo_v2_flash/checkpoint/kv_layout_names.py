"""Names of the FP8 K/V scale layouts, importable without torch (CLI ``--help`` must stay fast)."""

from __future__ import annotations

KV_LAYOUT_CHOICES = ("auto", "grid", "fused_kv", "fused_kv_split", "per_rank:T", "rank_fused:T")


def parse_kv_layout(value: str) -> str:
    """Validate a ``--fp8-kv-layout`` value (``auto``, ``grid``, ``fused_kv``, ``fused_kv_split``, ``per_rank:T``,
    ``rank_fused:T``)."""
    if value in ("auto", "grid", "fused_kv", "fused_kv_split"):
        return value
    for family in ("per_rank:", "rank_fused:"):
        count = value[len(family) :]
        if value.startswith(family) and count.isdigit() and int(count) > 0:
            return f"{family}{int(count)}"
    raise ValueError(f"unknown FP8 K/V layout {value!r}: expected one of {', '.join(KV_LAYOUT_CHOICES)}")
