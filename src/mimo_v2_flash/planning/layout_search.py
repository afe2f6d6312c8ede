"""Layout search of the parallelism planner: the layouts a GPU count allows, their per-GPU memory, the preferred one.

``recommend`` plans with the recipe's default activations (4k / 32k shown); ``recommend_long_context`` at a given
sequence length with context parallelism, falling back to full recompute where selective recompute does not fit.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

DEFAULT_SEQ_LENGTH = 4096
POWERS = (1, 2, 4, 8, 16, 32, 64)
CP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
FULL_RECOMPUTE_OVERRIDES = (
    "model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1"
)


@dataclass(frozen=True)
class Layout:
    """A parallel layout on ``gpus`` GPUs (DP is what TP x PP x CP leaves)."""

    tp: int
    pp: int
    ep: int
    etp: int
    gpus: int
    cp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Expert data-parallel size (experts fold TP x CP x DP into ETP x EP x EDP)."""
        return max(self.gpus // (self.ep * self.etp * self.pp), 1)

    def describe(self, with_cp: bool) -> str:
        """``TP 8 PP 1 [CP 2] EP 8 ETP 1 (DP 1)``."""
        cp = f" CP {self.cp}" if with_cp else ""
        return f"TP {self.tp} PP {self.pp}{cp} EP {self.ep} ETP {self.etp} (DP {self.dp})"


def evaluate(arch, mtp, layout: Layout, args):
    from mimo_v2_flash.planning.parallel_plan import GIB, plan_rank_memory

    mem = plan_rank_memory(arch, layout.tp, layout.pp, layout.ep, layout.etp, mtp, args.lora_rank)
    budget = args.gpu_memory_gb - args.activation_headroom_gb
    full = mem.full_finetune_bytes(layout.dp * layout.cp, args.distributed_optimizer, layout.expert_dp) / GIB
    lora = mem.lora_bytes() / GIB
    return layout.dp, mem, full, lora, full <= budget, lora <= budget


def usable_gib(args) -> float:
    """GiB per GPU that parameters, optimizer state and activations may use with --seq-length / --cp."""
    return args.gpu_memory_gb - args.reserve_gb


def seq_length(args) -> int:
    return DEFAULT_SEQ_LENGTH if args.seq_length is None else args.seq_length


def recommend(arch, mtp, args, check) -> int:
    """For each GPU count: the valid layout with the least full-FT memory per rank (distributed optimizer, as the
    recipe), with its weights / gradients / optimizer state / activations; and the same for LoRA."""
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.planning.parallel_plan import GIB, activation_bytes, plan_rank_memory

    args.distributed_optimizer = True

    for gpus in args.recommend:
        best = {}
        for tp, pp, ep, etp in itertools.product([t for t in POWERS if t <= 8], POWERS, POWERS, [1, 2]):
            if tp * pp > gpus:
                continue
            try:
                check(arch, tp, pp, ep, etp, world_size=gpus)
            except MiMoV2FlashConfigError:
                continue
            layout = Layout(tp, pp, ep, etp, gpus)
            _, _, full, lora, _, _ = evaluate(arch, mtp, layout, args)
            for mode, value in (("full", full), ("lora", lora)):
                key = (value, tp * pp, etp)  # least memory, then least model parallelism, then ETP 1 (the recipe's)
                if mode not in best or key < best[mode][0]:
                    best[mode] = (key, layout)
        for mode in ("full", "lora"):
            (value, *_), layout = best[mode]
            acts = [activation_bytes(arch, layout.tp, layout.pp, seq, mtp) / GIB for seq in (4096, 32768)]
            fits = value + acts[0] <= args.gpu_memory_gb
            detail = ""
            if mode == "full":
                mem = plan_rank_memory(arch, layout.tp, layout.pp, layout.ep, layout.etp, mtp, args.lora_rank)
                parts = mem.full_finetune_parts(layout.dp, True, layout.expert_dp)
                detail = "weights {:.1f} + grads {:.1f} + optimizer {:.1f}; ".format(*(p / GIB for p in parts))
            print(
                f"{gpus:3d} GPUs, {mode:4s}: {layout.describe(False)} -> {value:6.1f} GiB/rank "
                f"({detail}activations 4k {acts[0]:.1f}, 32k {acts[1]:.1f}; "
                f"{'fits' if fits else 'does not fit'} {args.gpu_memory_gb:.0f} GiB at 4k)"
            )
    return 0


@dataclass(frozen=True)
class Candidate:
    """A layout's per-GPU memory at the planned sequence length, in GiB."""

    layout: Layout
    parts: tuple[tuple[str, float], ...]  # (name, GiB) of weights and optimizer state
    activations: float
    gathered_kv: float
    recompute: str = "selective"

    @property
    def states(self) -> float:
        return sum(value for _, value in self.parts)

    @property
    def total(self) -> float:
        return self.states + self.activations


def _candidates(arch, mtp, args, check, gpus: int):
    """Every valid layout on ``gpus`` GPUs with CP, as ``(mode, Candidate)`` for full fine-tuning and LoRA."""
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.planning.parallel_plan import activation_memory, plan_rank_memory

    seq = seq_length(args)
    rank_memory = functools.cache(lambda *key: plan_rank_memory(arch, *key, mtp, args.lora_rank))
    activations = functools.cache(
        lambda tp, pp, cp, recompute: activation_memory(arch, tp, pp, seq, mtp, cp=cp, recompute=recompute)
    )
    cps = CP_SIZES if args.cp is None else (args.cp,)
    for tp, pp, cp, ep, etp in itertools.product([t for t in POWERS if t <= 8], POWERS, cps, POWERS, [1, 2]):
        if tp * pp * cp > gpus:
            continue
        try:
            check(arch, tp, pp, ep, etp, cp=cp, world_size=gpus, seq_length=seq)
        except MiMoV2FlashConfigError:
            continue
        layout = Layout(tp, pp, ep, etp, gpus, cp)
        mem = rank_memory(tp, pp, ep, etp)
        full = mem.full_finetune_parts(layout.dp * cp, True, layout.expert_dp)
        for mode, parts in (
            ("full", _named(("weights", "grads", "optimizer"), full)),
            ("lora", _named(("base", "adapters"), mem.lora_parts())),
        ):
            yield mode, _with_activations(layout, parts, activations, usable_gib(args))


def _with_activations(layout: Layout, parts, activations, usable: float) -> Candidate:
    """The layout with the recipe's selective recompute, or with full recompute where selective does not fit."""
    from mimo_v2_flash.planning.parallel_plan import GIB

    for recompute in ("selective", "full"):
        acts = activations(layout.tp, layout.pp, layout.cp, recompute)
        candidate = Candidate(layout, parts, acts.total / GIB, acts.gathered_kv / GIB, recompute)
        if candidate.total <= usable:
            break
    return candidate


def _named(names: tuple[str, ...], values: tuple[float, ...]) -> tuple[tuple[str, float], ...]:
    """``(name, GiB)`` pairs of byte counts."""
    from mimo_v2_flash.planning.parallel_plan import GIB

    return tuple((name, value / GIB) for name, value in zip(names, values, strict=True))


def _preference(candidate: Candidate, usable: float) -> tuple:
    """Sort key: layouts that fit ``usable`` GiB first, those with the recipe's selective recompute before those
    needing full recompute (a third more compute; CP costs communication only), then the most data-parallel (least
    TP x PP x CP), the least memory, ETP 1 (the recipe's); then the rest by least memory."""
    layout = candidate.layout
    parallel = layout.tp * layout.pp * layout.cp
    full = candidate.recompute == "full"
    if candidate.total <= usable:
        return (0, full, parallel, candidate.total, layout.etp)
    return (1, candidate.total, parallel, full, layout.etp)


def recommend_long_context(arch, mtp, args, check) -> int:
    """For each GPU count and mode: the preferred layout at --seq-length, CP included, with its per-GPU memory
    (weights / gradients / optimizer state or frozen base / adapters, and activations)."""
    seq = seq_length(args)
    label = f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)
    full_recompute = False
    for gpus in args.recommend:
        best: dict[str, Candidate] = {}
        for mode, candidate in _candidates(arch, mtp, args, check, gpus):
            preferred = best.get(mode)
            if preferred is None or _preference(candidate, usable_gib(args)) < _preference(
                preferred, usable_gib(args)
            ):
                best[mode] = candidate
        if not best:
            print(f"{gpus:3d} GPUs: no valid layout with --seq-length {seq}")
            continue
        for mode in ("full", "lora"):
            _print_candidate(gpus, mode, best[mode], label, args)
            full_recompute |= best[mode].recompute == "full"
    if full_recompute:
        print(f"recompute full: pass finetune.sh {FULL_RECOMPUTE_OVERRIDES}")
    return 0


def _print_candidate(gpus: int, mode: str, candidate: Candidate, label: str, args) -> None:
    parts = " + ".join(f"{name} {value:.1f}" for name, value in candidate.parts)
    fits = candidate.total <= usable_gib(args)
    print(
        f"{gpus:3d} GPUs, {mode:4s}: {candidate.layout.describe(True)} -> {candidate.states:6.1f} GiB/rank "
        f"({parts}; activations {label} {candidate.activations:.1f} (K/V {candidate.gathered_kv:.1f}), "
        f"recompute {candidate.recompute}; "
        f"total {candidate.total:.1f}; {'fits' if fits else 'does not fit'} {args.gpu_memory_gb:.0f} GiB "
        f"({args.reserve_gb:.0f} reserved) at {label})"
    )
