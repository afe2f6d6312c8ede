"""Trainium instances and the NxDI layout constraints for MiMo-V2-Flash (pure arithmetic, no SDK needed).

Sources: trn2 hardware from the Neuron docs ("16 Trainium2 chips with eight physical NeuronCores and 96 GiB of
HBM each; LNC2 ... 64 ranks per instance and approximately 24 GiB of HBM per rank"); host RAM of trn2.48xlarge
(2 TiB) and its usable NVMe (~1.7 TB under /opt/dlami/nvme) as reported in NxDI PR #119; trn2.3xlarge (one chip,
128 GiB host RAM) from the EC2 instance list. Constraints, from NxDI code (see each check's message):

* attention (contrib ``modeling_mimo_v2.py``): Q heads are split over TP. When ``tp > num_kv_heads`` a layer
  replicates K/V to all Q heads (CONVERT_TO_MHA) and the KV cache holds ``heads / tp`` heads per rank; otherwise
  TP must divide the KV heads and the cache holds ``max(full, swa) KV heads / tp`` (full layers are padded 4 -> 8).
  V is padded to the Q/K head dim in the cache (128 -> 192). A TP between the two KV head counts mixes both modes,
  whose cache shapes disagree.
* MoE (NxDI ``moe_v2.initialize_moe_process_group``, NxD ``ExpertMLPsV2.forward``): ``moe_tp * moe_ep`` ranks form
  the TP group; experts are split evenly over EP; in token generation EP > 1 needs
  ``batch * top_k / num_experts >= 1`` (else "Selective Loading with Expert parallelism is not supported").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Instance:
    """A Trainium instance type."""

    name: str
    chips: int
    cores_per_chip: int
    hbm_per_chip_gib: float
    host_ram_gib: float
    local_disk_tb: float | None

    def logical_cores(self, lnc: int) -> int:
        return self.chips * self.cores_per_chip // lnc

    def hbm_per_core_bytes(self, lnc: int) -> int:
        return int(self.hbm_per_chip_gib * GIB * lnc // self.cores_per_chip)


INSTANCES = {
    "trn2.48xlarge": Instance(
        "trn2.48xlarge", chips=16, cores_per_chip=8, hbm_per_chip_gib=96, host_ram_gib=2048, local_disk_tb=1.7
    ),
    "trn2.3xlarge": Instance(
        "trn2.3xlarge", chips=1, cores_per_chip=8, hbm_per_chip_gib=96, host_ram_gib=128, local_disk_tb=None
    ),
}


@dataclass(frozen=True)
class Layout:
    """The NxDI layout flags of ``plan`` / ``compile`` (``ep`` is NxDI's ``moe_ep_degree``)."""

    tp: int = 64
    ep: int = 64
    moe_tp: int = 1
    batch_size: int = 32
    seq_len: int = 8192
    logical_nc_config: int = 2
    instance: str = "trn2.48xlarge"
    max_context_length: int | None = None

    @property
    def context_length(self) -> int:
        return self.max_context_length or self.seq_len


def kv_mode(tp: int, kv_heads: int) -> str:
    """``"mha"`` when the adapter replicates K/V to all Q heads (tp > kv heads), else ``"gqa"``."""
    return "mha" if tp > kv_heads else "gqa"


def cache_heads_per_rank(arch, tp: int) -> int:
    """KV heads each rank stores per layer (NeuronMiMoV2Model.setup_attr_for_model)."""
    if tp > min(arch.full_num_kv_heads, arch.swa_num_kv_heads):
        return arch.num_attention_heads // tp
    return max(1, max(arch.full_num_kv_heads, arch.swa_num_kv_heads) // tp)


def _attention_problems(arch, layout: Layout) -> list[str]:
    tp, heads = layout.tp, arch.num_attention_heads
    full, swa = arch.full_num_kv_heads, arch.swa_num_kv_heads
    problems = []
    if heads % tp:
        problems.append(f"TP {tp} does not divide the {heads} attention heads; use a divisor of {heads}")
    if kv_mode(tp, full) != kv_mode(tp, swa):
        low, high = sorted((full, swa))
        problems.append(
            f"TP {tp} lies between the KV head counts (full {full}, SWA {swa}): the adapter would replicate K/V "
            f"to {heads} heads on some layers only and the shared KV cache shapes disagree; "
            f"use TP <= {low} or TP > {high}"
        )
    for kind, kv in (("full-attention", full), ("SWA", swa)):
        if kv_mode(tp, kv) == "gqa" and kv % tp:
            problems.append(f"TP {tp} does not divide the {kv} {kind} KV heads; use a divisor of {kv}")
    for name, size in (("hidden size", arch.hidden_size), ("dense intermediate size", arch.ffn_hidden_size)):
        if size % tp:
            problems.append(f"TP {tp} does not divide the {name} {size}")
    return problems


def _moe_problems(arch, layout: Layout) -> list[str]:
    problems = []
    if layout.moe_tp * layout.ep != layout.tp:
        problems.append(
            f"MoE TP {layout.moe_tp} x EP {layout.ep} = {layout.moe_tp * layout.ep} must equal TP {layout.tp} "
            f"(the MoE mesh covers the TP ranks); e.g. --moe-tp {max(1, layout.tp // max(layout.ep, 1))} "
            f"with --ep {layout.ep}"
        )
    if layout.ep < 1 or arch.num_experts % layout.ep:
        problems.append(
            f"EP {layout.ep} does not divide the {arch.num_experts} experts; use a divisor of {arch.num_experts}"
        )
    if layout.moe_tp < 1 or arch.moe_ffn_hidden_size % layout.moe_tp:
        problems.append(
            f"MoE TP {layout.moe_tp} does not divide the expert intermediate size {arch.moe_ffn_hidden_size}"
        )
    if layout.ep > 1 and layout.batch_size * arch.moe_topk < arch.num_experts:
        need = math.ceil(arch.num_experts / arch.moe_topk)
        problems.append(
            f"batch size {layout.batch_size} x top-{arch.moe_topk} < {arch.num_experts} experts: NxD refuses expert "
            f"parallelism in token generation ('Selective Loading with Expert parallelism is not supported'); "
            f"use --batch-size >= {need}, or --ep 1 --moe-tp {layout.tp}"
        )
    return problems


def layout_problems(arch, layout: Layout) -> list[str]:
    """Every reason ``layout`` cannot run ``arch`` with NxDI's MiMo adapter, each saying what to change."""
    problems = []
    instance = INSTANCES.get(layout.instance)
    if instance is None:
        return [f"unknown instance {layout.instance!r}; known: {', '.join(INSTANCES)}"]
    if layout.logical_nc_config not in (1, 2):
        problems.append(f"logical NC config {layout.logical_nc_config} is not 1 or 2 (Trainium2 supports LNC 1 and 2)")
        return problems
    cores = instance.logical_cores(layout.logical_nc_config)
    if layout.tp < 1 or layout.tp > cores:
        problems.append(
            f"TP {layout.tp} needs {layout.tp} logical cores; {layout.instance} has {cores} at "
            f"LNC {layout.logical_nc_config}; use --tp <= {cores}"
        )
    if min(layout.batch_size, layout.seq_len) < 1:
        problems.append("batch size and sequence length must be positive")
    if layout.seq_len > arch.max_position_embeddings:
        problems.append(f"seq_len {layout.seq_len} exceeds max_position_embeddings {arch.max_position_embeddings}")
    if layout.context_length > layout.seq_len:
        problems.append(f"max context length {layout.context_length} exceeds seq_len {layout.seq_len}")
    if layout.tp >= 1:
        problems += _attention_problems(arch, layout)
        problems += _moe_problems(arch, layout)
    return problems
