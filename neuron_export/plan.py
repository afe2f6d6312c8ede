"""``plan``: check an NxDI layout against the model and print per-rank HBM, host RAM and disk needs.

Reads ``config.json`` (``--config-only``) or config + safetensors headers (also checking the checkpoint the way
``inspect`` does). Nothing is loaded onto a device; an infeasible layout is an :class:`ExportError` that says
what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mimo_v2_flash import config as mimo_config
from neuron_export import nxdi_contract
from neuron_export.errors import ExportError
from neuron_export.layout import INSTANCES, Layout, kv_mode, layout_problems
from neuron_export.memory import MemoryPlan, plan_memory

GIB, GB = 1024**3, 1e9
TIGHT = 0.85


@dataclass
class Plan:
    """A checked layout: the text report and the problems (empty when feasible)."""

    text: str
    problems: list[str]
    memory: MemoryPlan | None


def architecture_from_config(path: str | Path):
    """Normalized architecture from ``config.json`` (a file, or the directory holding it)."""
    config = mimo_config.load_config_dict(path)
    where = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    identity = nxdi_contract.identity_problem(config)
    if identity:
        raise ExportError(f"{where}: {identity}")
    try:
        arch = mimo_config.parse_architecture(config)
    except mimo_config.MiMoV2FlashConfigError as error:
        raise ExportError(f"{where}: {error}") from None
    unsupported = nxdi_contract.unsupported_by_adapter(arch)
    if unsupported:
        raise ExportError(f"{where}: {unsupported[0]}")
    return arch


def architecture_from_checkpoint(path: str | Path):
    """Architecture of a checkpoint whose headers ``inspect`` finds no problem in."""
    from neuron_export.inspection import inspect_checkpoint

    report = inspect_checkpoint(path)
    if report.problems:
        more = f" (+{len(report.problems) - 1} more; see 'neuron_export inspect')" if len(report.problems) > 1 else ""
        raise ExportError(f"{report.problems[0]}{more}")
    return report.arch


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def render(arch, layout: Layout, memory: MemoryPlan, problems: list[str]) -> str:
    """The ``plan`` text report."""
    instance = INSTANCES[layout.instance]
    full_kv, swa_kv, experts = arch.full_num_kv_heads, arch.swa_num_kv_heads, arch.num_experts
    n_full = sum(t == "full_attention" for t in arch.layer_types)
    if {kv_mode(layout.tp, full_kv), kv_mode(layout.tp, swa_kv)} == {"mha"}:
        attention = (
            f"TP {layout.tp} > KV heads (full {full_kv}, SWA {swa_kv}): NxDI's converter replicates K/V to "
            f"{arch.num_attention_heads} heads (CONVERT_TO_MHA)"
        )
    else:
        attention = f"GQA: full-attention KV heads padded {full_kv} -> {max(full_kv, swa_kv)} in the shared cache"
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in memory.weights_by_part.items())
    total_disk = memory.prepared_bytes + memory.sharded_checkpoint_bytes
    nvme = f"; local NVMe ~{instance.local_disk_tb} TB" if instance.local_disk_tb else ""
    lines = [
        f"MiMo-V2-Flash on {layout.instance}: TP {layout.tp} (MoE EP {layout.ep} x MoE TP {layout.moe_tp}), "
        f"LNC {layout.logical_nc_config}, batch {layout.batch_size}, seq_len {layout.seq_len}",
        f"model      {arch.num_layers} layers ({n_full} full, {arch.num_layers - n_full} SWA), {experts} experts "
        f"top-{arch.moe_topk}; {memory.total_params / 1e9:.1f} B params without MTP",
        f"attention  {attention}",
        f"KV cache   {memory.cache_heads_per_rank} KV head(s) per rank and layer, V head dim {arch.v_head_dim} padded "
        f"to {memory.cache_head_dim}",
        f"experts    {experts // layout.ep} per rank ({experts} / EP {layout.ep}), intermediate "
        f"{arch.moe_ffn_hidden_size} / MoE TP {layout.moe_tp}; token generation: batch {layout.batch_size} x "
        f"top-{arch.moe_topk} = {layout.batch_size * arch.moe_topk} (EP > 1 needs >= {experts})",
        f"HBM/rank   budget {_gib(memory.hbm_per_rank)} "
        f"({instance.logical_cores(layout.logical_nc_config)} logical cores at LNC {layout.logical_nc_config})",
        f"  weights  {_gib(memory.weights_per_rank)}  ({parts})",
        f"  KV cache {_gib(memory.kv_cache_per_rank)}  ({arch.num_layers} layers x K,V x batch {layout.batch_size} x "
        f"{layout.seq_len} tokens x {memory.cache_heads_per_rank} head x {memory.cache_head_dim} x 2 B)",
        f"  total    {_gib(memory.used_per_rank)}  ({100 * memory.utilization:.1f} %; activations, scratchpad "
        "and the runtime need the rest)",
        f"host RAM   compile ~{_gib(memory.compile_host_bytes)} of {instance.host_ram_gib:.0f} GiB "
        f"(NxDI holds the whole BF16 state dict); prepare ~{_gib(memory.prepare_host_bytes)}",
        f"disk       prepared {memory.prepared_bytes / GB:.1f} GB + sharded weights "
        f"{memory.sharded_checkpoint_bytes / GB:.1f} GB = {total_disk / GB:.1f} GB, plus the source checkpoint{nvme}",
    ]
    if not problems and memory.utilization > TIGHT:
        lines.append(f"warning    weights + KV cache use over {TIGHT:.0%} of HBM; compile may fail on activations")
    lines.append("result     " + ("feasible" if not problems else f"INFEASIBLE ({len(problems)} problem(s))"))
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def plan(path: str | Path, layout: Layout, config_only: bool = False) -> Plan:
    """Check ``layout`` for the model at ``path``; never raises for an infeasible layout (see ``problems``)."""
    arch = architecture_from_config(path) if config_only else architecture_from_checkpoint(path)
    problems = layout_problems(arch, layout)
    positive = min(layout.tp, layout.ep, layout.moe_tp, layout.batch_size, layout.seq_len) >= 1
    if layout.instance not in INSTANCES or layout.logical_nc_config not in (1, 2) or not positive:
        return Plan("\n".join(f"  - {p}" for p in problems), problems, None)
    memory = plan_memory(arch, layout)
    if memory.used_per_rank > memory.hbm_per_rank:
        per_token = memory.kv_cache_per_rank / (layout.batch_size * layout.seq_len)
        room = memory.hbm_per_rank - memory.weights_per_rank
        hint = (
            f"at most {int(room // (per_token * layout.batch_size))} tokens at batch {layout.batch_size}"
            if room > 0
            else "the weights alone exceed it: raise --ep/--tp"
        )
        problems.append(
            f"weights + KV cache need {_gib(memory.used_per_rank)} per rank, above the "
            f"{_gib(memory.hbm_per_rank)} budget; lower --seq-len/--batch-size ({hint})"
        )
    return Plan(render(arch, layout, memory, problems), problems, memory)
