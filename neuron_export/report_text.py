"""Human-readable rendering of an :class:`~neuron_export.inspection.Inspection`."""

from __future__ import annotations

from neuron_export.inspection import PREPARED, Inspection

MAX_LISTED_PROBLEMS = 50


def human_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 kB"`` (decimal units, like file sizes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def ranges(indices: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts) or "-"


def render(report: Inspection) -> str:
    """The ``inspect`` text report."""
    lines = [f"checkpoint:  {report.path}"]
    if report.tensors:
        lines.append(f"layout:      {report.layout}{' (ready for NxDI)' if report.layout == PREPARED else ''}")
        fp8_note = (
            " (float8_e4m3fn weights with _scale_inv blocks; prepare dequantizes to BF16)"
            if report.format == "FP8"
            else ""
        )
        lines.append(f"format:      {report.format}{fp8_note}")
        lines.append(f"tensors:     {report.tensors} in {report.shards} shard(s)")
        per_dtype = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(report.bytes_by_dtype.items()))
        lines.append(f"bytes:       {per_dtype} (total {human_bytes(sum(report.bytes_by_dtype.values()))})")
    if report.layers:
        full = [layer["index"] for layer in report.layers if layer["attention"] == "full"]
        sliding = [layer["index"] for layer in report.layers if layer["attention"] == "sliding"]
        moe = [layer["index"] for layer in report.layers if layer["mlp"] == "moe"]
        dense = [layer["index"] for layer in report.layers if layer["mlp"] == "dense"]
        lines += [
            f"model:       {report.model_type}, {report.num_layers} layers",
            f"attention:   full at {ranges(full)} ({len(full)}); sliding window at {ranges(sliding)} ({len(sliding)})",
            f"mlp:         dense at {ranges(dense)}; MoE at {ranges(moe)}",
            f"experts:     {report.num_experts} routed, top-{report.experts_per_token}",
        ]
        where = "kept apart in mtp/" if report.layout == PREPARED else "dropped by prepare unless --keep-mtp"
        lines.append(f"MTP layers:  {report.mtp_layers}" + (f" ({where})" if report.mtp_layers else ""))
    if report.problems:
        lines.append(f"problems:    {len(report.problems)}")
        lines += [f"  - {p}" for p in report.problems[:MAX_LISTED_PROBLEMS]]
        if len(report.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(report.problems) - MAX_LISTED_PROBLEMS} more (--json lists all)")
    else:
        lines.append("problems:    none")
    return "\n".join(lines)
