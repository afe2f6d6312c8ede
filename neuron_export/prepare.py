"""``prepare``: write the NxDI-ready BF16 checkpoint, streaming tensor by tensor and shard by shard.

Per tensor: FP8 weights are dequantized exactly by the project's ``FP8Checkpoint`` (fp32 product, one cast), then
cast to BF16; the router correction bias stays fp32 and is renamed to the name NxDI loads; shapes are kept
(no K/V replication, experts stay separate: NxDI's converter does both); MTP layers are dropped or, with
``keep_mtp``, written to ``mtp/`` with their own index. Memory holds at most one output shard (the project's
``ShardWriter``) plus the tensor being converted. Output is staged in a hidden sibling and renamed at the end;
a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from mimo_v2_flash import config as mimo_config
from mimo_v2_flash.checkpoint import fp8 as fp8_checkpoint
from mimo_v2_flash.checkpoint import fused_qkv, hf_checkpoint, hf_writer, output_dirs, validation
from neuron_export import nxdi_contract
from neuron_export.errors import ExportError
from neuron_export.inspection import PREPARED, inspect_checkpoint
from neuron_export.manifest import write_manifest

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _refuse_problems(source: Path) -> None:
    report = inspect_checkpoint(source)
    if report.problems:
        more = f" (+{len(report.problems) - 1} more; see 'neuron_export inspect')" if len(report.problems) > 1 else ""
        raise ExportError(f"{report.problems[0]}{more}")
    if report.layout == PREPARED:
        raise ExportError(
            f"{source}: already an NxDI-prepared checkpoint (router bias named {nxdi_contract.NXDI_ROUTER_BIAS})"
        )


def refuse_overlap(source: Path, output: Path) -> None:
    """Refuse an output that contains, equals or lies inside ``source`` (replacing it would destroy the input)."""
    src, out = source.resolve(), output.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise ExportError(f"{output}: output must not contain, or lie inside, the input checkpoint {source}")


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    # disable=None: shown on a terminal, silent when stderr is a pipe or a file (logs, tests).
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def _plan_tensors(reader, keep_mtp: bool) -> list[tuple[str, str, str]]:
    """``(source name, output name, "main" | "mtp")`` in source-shard order (sequential reads); MiMo-V2.5's towers
    are left out (NxDI's MiMo model is text-only)."""
    ckpt = reader.checkpoint
    plan = []
    towers = set(validation.tower_tensors(ckpt.keys()))
    for name in sorted(set(reader.weight_names()) - towers, key=lambda n: (ckpt.weight_map[n], n)):
        if nxdi_contract.is_mtp(name):
            if keep_mtp:
                plan.append((name, name, "mtp"))
        else:
            plan.append((name, nxdi_contract.prepared_name(name), "main"))
    return plan


def _write_tensors(reader, plan, writers: dict, bar) -> int:
    import torch

    written = 0
    for source_name, output_name, target in plan:
        dtype = torch.float32 if nxdi_contract.output_dtype_name(output_name) == "float32" else torch.bfloat16
        tensor = reader.get(source_name, dtype)
        if source_name.endswith(fused_qkv.FUSED_QKV_SUFFIX):
            parts = _split_fused(reader, source_name, tensor)
        else:
            parts = {output_name: tensor}
        for name, part in parts.items():
            writers[target].add(name, part)
        written += tensor.numel() * tensor.element_size()
        bar.update(tensor.numel() * tensor.element_size())
    return written


def _split_fused(reader, name: str, tensor) -> dict:
    """A MiMo-V2 family ``qkv_proj`` (dequantized per chunk) as the hub's ``q_proj`` / ``k_proj`` / ``v_proj``."""
    arch = mimo_config.parse_architecture(reader.checkpoint.config)
    kv_heads = arch.swa_num_kv_heads if reader.is_sliding_layer(name) else arch.full_num_kv_heads
    dk, dv = reader.kv_head_dims(name)
    q, k, v = fused_qkv.split_fused_qkv(
        tensor, reader.fused_chunks(), arch.num_attention_heads, kv_heads, dk, dv, name
    )
    return {name.replace("qkv_proj", f"{p}_proj"): t.contiguous() for p, t in zip("qkv", (q, k, v), strict=True)}


def prepare(
    hf_path: str | Path,
    output: str | Path,
    keep_mtp: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    fp8_kv_layout: str = "auto",
) -> dict[str, Any]:
    """Write the NxDI-ready checkpoint of ``hf_path`` to ``output``; returns a summary.

    ``fp8_kv_layout``: ``auto`` (each K/V pair's FP8 scale layout decided from its data, as the Megatron import
    does) or the layout every pair must have.
    """
    source, output = Path(hf_path), Path(output)
    start = time.perf_counter()
    _refuse_problems(source)
    refuse_overlap(source, output)
    output_dirs.check_output_dir(output, overwrite)
    reader = fp8_checkpoint.FP8Checkpoint(hf_checkpoint.HFCheckpoint(source), fp8_kv_layout)
    fp8_layouts = reader.resolve_all()  # every FP8 scale layout decided before anything is written
    config = nxdi_contract.nxdi_config(reader.checkpoint.config)
    plan = _plan_tensors(reader, keep_mtp)
    total = sum(
        math.prod(reader.logical_shape(s)) * (4 if nxdi_contract.output_dtype_name(o) == "float32" else 2)
        for s, o, _ in plan
    )
    staging = output_dirs.staging_dir(output)
    staging.mkdir()
    try:
        writers = {"main": hf_writer.ShardWriter(staging, max_shard_bytes)}
        if any(target == "mtp" for *_, target in plan):
            (staging / nxdi_contract.MTP_DIR).mkdir()
            writers["mtp"] = hf_writer.ShardWriter(staging / nxdi_contract.MTP_DIR, max_shard_bytes)
        with _progress_bar(total, "prepare (BF16 shards)") as bar:
            written = _write_tensors(reader, plan, writers, bar)
        shards = {target: len(set(writer.finish().values())) for target, writer in writers.items()}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = hf_writer.copy_artifacts(source, staging)
        hashed_total = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        with _progress_bar(hashed_total, "SHA256SUMS") as bar:
            write_manifest(staging, bar.update)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        output_dirs.replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    mtp_total = sum(1 for n in reader.weight_names() if nxdi_contract.is_mtp(n))
    return {
        "output": str(output),
        "tensors": sum(1 for *_, t in plan if t == "main"),
        "bytes": written,
        "shards": shards["main"],
        "mtp_tensors": mtp_total,
        "mtp": "kept in mtp/" if "mtp" in shards else "dropped" if mtp_total else "none",
        "copied": copied,
        "fp8_source": bool(fp8_layouts),
        "fp8_layouts": fp8_layouts,
        "seconds": time.perf_counter() - start,
    }
