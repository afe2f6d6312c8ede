"""HF <-> Megatron checkpoint conversion for MiMo-V2-Flash (what ``convert_checkpoints.py`` runs)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mimo_v2_flash.checkpoint.fp8 import FP8_DTYPE, LAYOUT_RECORD, SCALE_SUFFIX, FP8Checkpoint
from mimo_v2_flash.checkpoint.fp8_export import find_layout_record, layout_record, plan_fp8_export
from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, HFCheckpoint
from mimo_v2_flash.checkpoint.output_dirs import check_output_dir, replace_directory, staging_dir
from mimo_v2_flash.checkpoint.validation import tower_counts, tower_tensors, validate_checkpoint
from mimo_v2_flash.config import FUSED_PROJECTIONS, projection_layout

GB = 1024**3


def return_freed_memory_to_the_system() -> None:
    """Conversion allocates and frees tensors of every size; glibc's adaptive mmap threshold would then serve them
    from the heap, where freed memory fragments and RSS keeps growing. A fixed threshold keeps large tensors in
    their own mappings, released on free (the same as MALLOC_MMAP_THRESHOLD_=131072)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def import_checkpoint(
    hf_dir: Path,
    megatron_path: Path,
    dtype: torch.dtype,
    layout: dict,
    overwrite: bool = False,
    fp8_kv_layout: str = "auto",
) -> dict:
    """HF (FP8 or BF16/FP32) -> Megatron distributed checkpoint, written atomically.

    The checkpoint, the FP8 scale layout of every weight (``fp8_kv_layout``: ``auto`` or the layout every K/V
    pair must have) and the parallel layout are validated before the process groups are set up or anything is
    built; ``layout`` holds ``tp``, ``pp``, ``ep``, ``etp`` and ``cp`` (torchrun supplies the processes; the
    checkpoint written does not depend on ``cp``: context-parallel ranks hold the same weights).
    """
    import os

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge import MiMoV2FlashBridge
    from mimo_v2_flash.planning.parallel_layout import check_parallel_layout
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

    check_output_dir(megatron_path, overwrite)
    checkpoint = HFCheckpoint(hf_dir)
    arch, mtp_layers = validate_checkpoint(checkpoint)
    reader = FP8Checkpoint(checkpoint, fp8_kv_layout)
    fp8_layouts = reader.resolve_all()
    check_parallel_layout(arch, **layout, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    initialize_parallel_state(**layout)
    start = time.perf_counter()
    with MiMoV2FlashBridge.reading_through(reader):
        _import_weights(hf_dir, megatron_path, dtype, layout)
    if fp8_layouts and is_rank0():
        # The layouts decided here go with the checkpoint, so an FP8 export writes them back without deciding again.
        record = megatron_path / LAYOUT_RECORD
        staged = record.with_name(f".{record.name}.partial")
        staged.write_text(json.dumps(layout_record(reader, fp8_kv_layout), indent=1) + "\n")
        staged.rename(record)
    imported = [n for n in checkpoint.keys() if n not in set(tower_tensors(checkpoint.keys()))]
    return {
        "tensors": len([n for n in imported if not n.endswith(SCALE_SUFFIX)]),
        "bytes": sum(checkpoint.nbytes(n) for n in imported),
        "towers": tower_counts(checkpoint.keys()),
        "seconds": time.perf_counter() - start,
        "layers": arch.num_layers,
        "mtp_layers": mtp_layers,
        "fp8_layouts": fp8_layouts,
    }


def _import_weights(hf_dir: Path, megatron_path: Path, dtype: torch.dtype, layout: dict) -> None:
    from megatron.bridge import AutoBridge
    from mimo_v2_flash.conversion.megatron_checkpoint import save_megatron_checkpoint
    from mimo_v2_flash.conversion.streaming_import import stream_import
    from mimo_v2_flash.runtime.inference import build_model, configure_provider

    if not dist.is_initialized() or dist.get_world_size() == 1:
        # One process: stream tensor by tensor into the checkpoint (memory bounded by a parameter, not the model).
        staged = staging_dir(megatron_path)
        try:
            stream_import(hf_dir, staged, dtype)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        replace_directory(staged, megatron_path)
    else:
        # Sharded: every rank builds and loads its own shard of the model, then all ranks save together.
        bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
        provider = configure_provider(
            bridge.to_megatron_provider(load_weights=True), dtype, parallel_output=True, **layout
        )
        save_megatron_checkpoint(build_model(provider), megatron_path, tokenizer_dir=hf_dir)


def export_checkpoint(
    hf_dir: Path,
    megatron_path: Path,
    hf_out: Path,
    dtype: torch.dtype,
    overwrite: bool = False,
    max_shard_gb: float = 5.0,
    adapter_out: Path | None = None,
    fp8: bool = False,
    fp8_serve_tp: int | None = None,
) -> dict:
    """Megatron checkpoint (or a fine-tuning output dir) -> HF shards in hub layout, config and tokenizer.

    Streams one layer at a time from the checkpoint (any saved layout) into bounded-size shards. The output of a
    LoRA run is exported merged (its base checkpoint plus the adapters); ``adapter_out`` additionally receives
    the adapters alone as a PEFT adapter in HF naming (``dtype``; bf16 when the main output is FP8).

    ``fp8``: write ``hf_dir``'s own block-FP8 format (its FP8 tensors in the scale layouts the import recorded or,
    without a record, the layouts its data decides; a BF16 source gets the release's format); ``fp8_serve_tp``
    lays K/V out for a vLLM / SGLang server at that attention TP (see :mod:`fp8_export`).
    """
    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_mappings import mimo_v2_flash_mapping_registry
    from mimo_v2_flash.checkpoint.hf_writer import write_hf_checkpoint
    from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir
    from mimo_v2_flash.checkpoint.validation import expected_tensors
    from mimo_v2_flash.conversion.lora_checkpoint import (
        LoraAdapters,
        find_lora_run,
        peft_adapter_config,
        peft_tensor_names,
    )
    from mimo_v2_flash.conversion.megatron_checkpoint import iter_hf_weights

    check_output_dir(hf_out, overwrite)
    if adapter_out is not None:
        check_output_dir(adapter_out, overwrite)
    source_checkpoint = HFCheckpoint(hf_dir)
    arch, mtp_layers = validate_checkpoint(source_checkpoint)
    if adapter_out is not None and projection_layout(source_checkpoint.config) == FUSED_PROJECTIONS:
        raise CheckpointError(
            f"{hf_dir}: --adapter-path: this base stores a fused qkv_proj, and the adapter would name q/k/v modules "
            "it does not have; export the merged model (without --adapter-path)"
        )
    latest_iteration_dir(megatron_path)
    lora_run = find_lora_run(megatron_path)
    if adapter_out is not None and lora_run is None:
        raise CheckpointError(f"{megatron_path}: not a LoRA run, there is no adapter to export")
    adapters = LoraAdapters(lora_run) if lora_run is not None else None
    quantizer = None
    if fp8:
        searched = [megatron_path, megatron_path / "pretrained"]
        if lora_run is not None:
            searched.append(lora_run.base_checkpoint)
        quantizer = plan_fp8_export(hf_dir, serve_tp=fp8_serve_tp, record=find_layout_record(searched))
        expected_scales = set(quantizer.scale_names())
        dtype = torch.bfloat16  # of the PEFT adapter and config.json's torch_dtype
    elif fp8_serve_tp is not None:
        raise CheckpointError("--fp8-serve-tp applies to --dtype fp8 only")
    peft_tensors: dict[str, torch.Tensor] = {}
    peft_modules: set[str] = set()

    def collect_adapter(hf_name: str, a: torch.Tensor, b_rows: torch.Tensor) -> None:
        a_name, b_name = peft_tensor_names(hf_name)
        peft_tensors[a_name], peft_tensors[b_name] = a.to(dtype, copy=True), b_rows.to(dtype, copy=True).contiguous()
        peft_modules.add(hf_name.removesuffix(".weight").rsplit(".", 1)[-1])

    expected = set(expected_tensors(arch, mtp_layers))
    bar = tqdm(
        total=len(expected) + (len(expected_scales) if fp8 else 0),
        unit="tensor",
        desc="export",
        disable=not is_rank0(),
        mininterval=1.0,
    )
    moved = {"bytes": 0}
    seen: set[str] = set()

    def progress(name: str, nbytes: int) -> None:
        moved["bytes"] += nbytes
        elapsed = max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{moved['bytes'] / elapsed / 1024**2:.1f} MB/s", refresh=False)
        bar.update(1)

    def checked(weights):
        for name, tensor in weights:
            seen.add(name)
            yield name, tensor
        missing, extra = sorted(expected - seen), sorted(seen - expected)
        if missing or extra:
            raise CheckpointError(
                f"{megatron_path}: checkpoint does not match {hf_dir / 'config.json'} "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        if adapters is not None and adapters.unused():
            raise CheckpointError(f"{megatron_path}: LoRA adapters with no base weight: {adapters.unused()[:3]}")

    source = lora_run.base_checkpoint if lora_run is not None else megatron_path
    sink = collect_adapter if adapter_out is not None else None
    weights = iter_hf_weights(source, mimo_v2_flash_mapping_registry(), lora=adapters, adapter_sink=sink)
    towers = ((name, source_checkpoint.get(name)) for name in tower_tensors(source_checkpoint.keys()))
    summary = write_hf_checkpoint(
        checked(weights),
        hf_dir,
        hf_out,
        dtype,
        int(max_shard_gb * GB),
        progress=progress,
        quantizer=quantizer,
        passthrough=towers,
    )
    bar.close()
    if quantizer is not None:
        summary["fp8_format"] = quantizer.description
        summary["fp8_layouts"] = quantizer.layout_counts()
    if adapter_out is not None:
        write_peft_adapter(peft_tensors, peft_adapter_config(lora_run, sorted(peft_modules), str(hf_dir)), adapter_out)
    return summary


def write_peft_adapter(tensors: dict[str, torch.Tensor], config: dict, adapter_out: Path) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout), written atomically."""
    import json

    from safetensors.torch import save_file

    staged = staging_dir(adapter_out)
    staged.mkdir(parents=True)
    save_file(tensors, str(staged / "adapter_model.safetensors"), metadata={"format": "pt"})
    (staged / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    replace_directory(staged, adapter_out)


def inspect_fp8(hf_dir: Path, kv_layout: str = "auto") -> list[str]:
    """Per tensor kind: the FP8 scale layout chosen and the evidence (blocks holding |fp8| = 448 per candidate).

    Reads headers, scales and the data of the tensors whose layout the shapes leave open (the K/V projections),
    never the experts' weights.
    """
    checkpoint = HFCheckpoint(hf_dir)
    fp8 = FP8Checkpoint(checkpoint, kv_layout)
    lines = [f"checkpoint: {hf_dir}", f"weight_block_size: {list(fp8.block) if fp8.block else None}"]
    if not fp8.is_fp8:
        lines.append("no FP8 tensors: nothing to dequantize")
        return lines
    kinds: dict[str, list[str]] = {}
    for name in fp8.weight_names():
        if checkpoint.dtype(name) == FP8_DTYPE:
            kinds.setdefault(_tensor_kind(name, fp8), []).append(name)
    for kind, names in sorted(kinds.items()):
        layouts: dict[str, int] = {}
        evidence: dict[str, list[int]] = {}
        for name in names:
            layout = fp8.layout(name)
            layouts[layout.kind] = layouts.get(layout.kind, 0) + 1
            for label, at_max, blocks, failure in layout.checked:
                totals = evidence.setdefault(label, [0, 0, 0])
                totals[0], totals[1], totals[2] = totals[0] + at_max, totals[1] + blocks, totals[2] + bool(failure)
        example = names[0]
        found = (
            "; ".join(
                f"{label} {at_max}/{blocks}" + (f" (rejected for {rejected} tensors)" if rejected else "")
                for label, (at_max, blocks, rejected) in evidence.items()
            )
            if evidence
            else fp8.layout(example).evidence
        )
        lines.append(
            f"{kind}: {len(names)} tensors, layout {layouts}; e.g. {example} weight {checkpoint.shape(example)} "
            f"scale {checkpoint.shape(example + SCALE_SUFFIX)}; evidence (blocks with |fp8| = 448): {found}"
        )
    mxfp4 = [name for name in fp8.weight_names() if fp8.is_mxfp4(name)]
    if mxfp4:
        lines.append(
            f"mxfp4 experts: {len(mxfp4)} tensors (uint8 E2M1 pairs + E8M0 _scale per 32 columns, decoded exactly); "
            f"e.g. {mxfp4[0]} packed {checkpoint.shape(mxfp4[0])}"
        )
    return lines + serving_report(fp8)


def serving_report(fp8: FP8Checkpoint) -> list[str]:
    """Per attention layer kind: the attention TPs at which vLLM's / SGLang's generic q/k/v scale rule reads every
    FP8 q/k/v element with its own scale (see :mod:`fp8_serving`), and what happens at the others."""
    from mimo_v2_flash.checkpoint.fp8_serving import AttentionGeometry, reads_exactly, serving_tps

    checkpoint = fp8.checkpoint
    heads = int(checkpoint.config["num_attention_heads"])
    verdicts: dict[str, dict[int, str]] = {}
    for q_name in fp8.weight_names():
        if not q_name.endswith("self_attn.q_proj.weight"):
            continue
        names = {p: q_name.replace("q_proj", f"{p}_proj") for p in "qkv"}
        if any(n not in checkpoint or checkpoint.dtype(n) != FP8_DTYPE for n in names.values()):
            continue
        k_layout = fp8.layout(names["k"])
        if len(k_layout.sources) != 2:
            continue  # K and V quantized apart: no fused K/V layout to check
        sq = checkpoint.shape(names["q"] + SCALE_SUFFIX)[0]
        scale_rows = (sq, *(checkpoint.shape(n + SCALE_SUFFIX)[0] for n in (names["k"], names["v"])))
        scales = torch.cat([checkpoint.get(n + SCALE_SUFFIX).float() for n in names.values()])
        row_maps = {
            "q": fp8.layout(names["q"]).row_to_scale_row,
            "k": k_layout.row_to_scale_row + sq,
            "v": fp8.layout(names["v"]).row_to_scale_row + sq,
        }
        dk, dv = fp8.kv_head_dims(names["k"])
        geometry = AttentionGeometry(heads, checkpoint.shape(names["k"])[0] // dk, dk, dv, fp8.block[0])
        kind = _tensor_kind(q_name, fp8).rsplit(".", 1)[0]
        for tp in serving_tps(heads):
            exact = reads_exactly(geometry, tp, row_maps, scales, scale_rows)
            verdict = "exact" if exact is True else "misread" if exact is False else "fails"
            previous = verdicts.setdefault(kind, {}).get(tp, "exact")
            verdicts[kind][tp] = verdict if previous == "exact" else previous
    lines = []
    for kind, by_tp in sorted(verdicts.items()):
        parts = [
            f"{verdict} at TP {[tp for tp, v in by_tp.items() if v == verdict]}"
            for verdict in ("exact", "misread", "fails")
            if verdict in by_tp.values()
        ]
        lines.append(f"serving {kind} (vLLM / SGLang q/k/v scale rule): " + "; ".join(parts))
    if verdicts:
        every = [tp for tp in serving_tps(heads) if all(v.get(tp) == "exact" for v in verdicts.values())]
        lines.append(f"serving: every attention layer read exactly at attention TP {every}")
    return lines


def _tensor_kind(name: str, fp8: FP8Checkpoint) -> str:
    parts = name.split(".")
    prefix = "mtp." if ".mtp." in name else ""
    if ".experts." in name:
        return f"{prefix}experts.{parts[-2]}"
    if "self_attn" in name and not prefix:
        prefix = "swa." if fp8.is_sliding_layer(name) else "full."
    return prefix + ".".join(parts[-3:-1]) if "self_attn" in name or "mlp" in name else prefix + parts[-2]
