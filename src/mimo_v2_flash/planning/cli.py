"""Per-rank memory of MiMo-V2-Flash for a parallel layout: parameters and optimizer state, full fine-tuning and LoRA.

    python plan_parallelism.py --tp 8 --pp 4 --ep 8 --gpus 32 [--gpu-memory-gb 80] [--hf-model DIR]
    python plan_parallelism.py --recommend 8 16 32 64      # best layouts for those H100 80 GB counts
    python plan_parallelism.py --tp 8 --cp 8 --ep 64 --gpus 64 --seq-length 131072   # a long-context layout
    python plan_parallelism.py --recommend --seq-length 131072 [--gpu-memory-gb 141]  # layouts with CP

Without --hf-model a released architecture is used (--model; 3 MTP layers). A layout "fits" when parameters +
gradients + optimizer state leave --activation-headroom-gb free per GPU; --recommend also prints the estimated
activations at 4k and 32k tokens (micro-batch 1, sequence parallel, selective recompute, as the recipe runs).

With --seq-length or --cp, the activations of that sequence length replace the headroom, and a layout fits when
it leaves --reserve-gb free: each context-parallel rank holds seq/CP tokens, so the stored activations fall by
CP, while one layer's K/V of the whole sequence (and their gradients) is gathered on every rank (MiMo's
all-gather CP). GPUs = TP x PP x CP x DP; the distributed optimizer shards over DP x CP. --recommend then also
searches CP (powers of two, or the --cp given) and prefers, among the layouts that fit, the most data parallelism
(least TP x PP x CP), then the least memory. A layout whose activations do not fit with the recipe's selective
recompute is planned with full recompute (every layer's input kept, one layer recomputed at a time), marked
"recompute full", with the Hydra overrides for finetune.sh printed.

CP layouts are for the TransformerEngine backend (TE >= 2.16): MiMo's sliding-window layers (window and learnable
sink) need cp_comm_type a2a, which splits each TP rank's query and KV heads over the CP ranks, so CP must divide
them (TP x CP <= 8 with MiMo-V2-Flash's 8 SWA KV heads); layouts TE cannot run are refused. The estimates count
no score matrix (TE's fused attention keeps none): the unfused local backend also holds (seq/CP) x seq attention
scores, printed when evaluating a layout.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RECOMMEND_GPUS = (8, 16, 32, 64, 128, 256)
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


def _arch(args):
    from mimo_v2_flash.config import parse_architecture, released_family_configs

    if args.hf_model is None:
        return parse_architecture(released_family_configs()[args.model]), 3
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
    from mimo_v2_flash.checkpoint.validation import validate_checkpoint

    return validate_checkpoint(HFCheckpoint(args.hf_model))


def _evaluate(arch, mtp, layout: Layout, args):
    from mimo_v2_flash.planning.parallel_plan import GIB, plan_rank_memory

    mem = plan_rank_memory(arch, layout.tp, layout.pp, layout.ep, layout.etp, mtp, args.lora_rank)
    budget = args.gpu_memory_gb - args.activation_headroom_gb
    full = mem.full_finetune_bytes(layout.dp * layout.cp, args.distributed_optimizer, layout.expert_dp) / GIB
    lora = mem.lora_bytes() / GIB
    return layout.dp, mem, full, lora, full <= budget, lora <= budget


def _usable(args) -> float:
    """GiB per GPU that parameters, optimizer state and activations may use with --seq-length / --cp."""
    return args.gpu_memory_gb - args.reserve_gb


def _long_context(args) -> bool:
    """Whether a sequence length or CP was asked for (then activations replace the headroom, and CP is shown)."""
    return args.seq_length is not None or args.cp is not None


def _seq_length(args) -> int:
    return DEFAULT_SEQ_LENGTH if args.seq_length is None else args.seq_length


def _check_seq_length(arch, seq_length: int) -> None:
    from mimo_v2_flash.config import MiMoV2FlashConfigError

    if seq_length < 1:
        raise MiMoV2FlashConfigError(f"--seq-length must be >= 1, got {seq_length}")
    if seq_length > arch.max_position_embeddings:
        raise MiMoV2FlashConfigError(
            f"--seq-length {seq_length} exceeds the model's max_position_embeddings={arch.max_position_embeddings}"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hf-model", type=Path, help="checkpoint whose config (and MTP count) to use")
    parser.add_argument(
        "--model",
        choices=["MiMo-V2-Flash", "MiMo-V2.5", "MiMo-V2.5-Pro"],
        default="MiMo-V2-Flash",
        help="released architecture to plan for without --hf-model (default MiMo-V2-Flash; V2.6-Flash has its size)",
    )
    for flag, default in (("tp", 8), ("pp", 1), ("ep", 8), ("etp", 1)):
        parser.add_argument(f"--{flag}", type=int, default=default, help=f"{flag.upper()} size (default {default})")
    parser.add_argument(
        "--cp",
        type=int,
        default=None,
        help="context-parallel size (default 1; with --recommend: search every CP)",
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help=f"tokens per sequence whose activations to count (default {DEFAULT_SEQ_LENGTH} with --cp)",
    )
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument(
        "--activation-headroom-gb", type=float, default=12.0, help="GiB kept for activations (default 12)"
    )
    parser.add_argument(
        "--reserve-gb",
        type=float,
        default=8.0,
        help="with --seq-length / --cp: GiB per GPU not planned for (CUDA context, NCCL buffers, allocator "
        "fragmentation; default 8)",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--distributed-optimizer",
        action="store_true",
        help="shard optimizer state over DP (always on with --recommend: the recipe uses it)",
    )
    parser.add_argument(
        "--recommend",
        type=int,
        nargs="*",
        metavar="GPUS",
        help=f"search layouts for these GPU counts (none given: {' '.join(map(str, DEFAULT_RECOMMEND_GPUS))})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.planning.parallel_layout import TE_CONTEXT_PARALLEL_MIN_VERSION, check_parallel_layout
    from mimo_v2_flash.planning.parallel_plan import total_parameters

    # CP layouts are planned for TransformerEngine on GPUs (not the TE installed here): refuse what TE cannot run.
    te_check = functools.partial(
        check_parallel_layout, transformer_engine=True, te_version=TE_CONTEXT_PARALLEL_MIN_VERSION
    )

    layout = Layout(args.tp, args.pp, args.ep, args.etp, args.gpus, 1 if args.cp is None else args.cp)
    try:
        arch, mtp = _arch(args)
        total, active = total_parameters(arch, mtp)
        print(f"model: {total / 1e9:.1f}B parameters ({active / 1e9:.1f}B active per token), {mtp} MTP layers")
        if _long_context(args):
            _check_seq_length(arch, _seq_length(args))
        if args.recommend is not None:
            args.recommend = args.recommend or list(DEFAULT_RECOMMEND_GPUS)
            if _long_context(args):
                return _recommend_long_context(arch, mtp, args, te_check)
            return _recommend(arch, mtp, args, check_parallel_layout)
        (te_check if layout.cp > 1 else check_parallel_layout)(
            arch,
            layout.tp,
            layout.pp,
            layout.ep,
            layout.etp,
            cp=layout.cp,
            world_size=layout.gpus,
            seq_length=_seq_length(args),
        )
    except (CheckpointError, MiMoV2FlashConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if _long_context(args):
        return _print_long_context_layout(arch, mtp, layout, args)
    return _print_layout(arch, mtp, layout, args)


def _print_layout(arch, mtp, layout: Layout, args) -> int:
    dp, mem, full, lora, full_fits, lora_fits = _evaluate(arch, mtp, layout, args)
    print(f"layout: TP {args.tp} x PP {args.pp} (DP {dp}), experts EP {args.ep} x ETP {args.etp}, {args.gpus} GPUs")
    _print_rank_parameters(mem, args)
    budget = args.gpu_memory_gb - args.activation_headroom_gb
    print(
        f"full fine-tuning ({_optimizer(args)}): {full:.1f} GiB/rank -> "
        f"{'fits' if full_fits else 'does NOT fit'} in {budget:.0f} GiB"
    )
    print(
        f"LoRA (frozen bf16 base):    {lora:.1f} GiB/rank -> "
        f"{'fits' if lora_fits else 'does NOT fit'} in {budget:.0f} GiB"
    )
    return 0


def _print_rank_parameters(mem, args) -> None:
    print(
        f"per rank: {mem.dense_params / 1e9:.2f}B non-expert + {mem.expert_params / 1e9:.2f}B expert parameters; "
        f"LoRA r={args.lora_rank}: {mem.lora_params / 1e6:.1f}M trainable"
    )


def _optimizer(args) -> str:
    return "distributed optimizer" if args.distributed_optimizer else "optimizer state not sharded"


def _print_long_context_layout(arch, mtp, layout: Layout, args) -> int:
    """The layout with the activations of --seq-length in place of the headroom, CP included."""
    from mimo_v2_flash.planning.parallel_plan import GIB, activation_memory, unfused_score_bytes

    seq = _seq_length(args)
    dp, mem, full, lora, _, _ = _evaluate(arch, mtp, layout, args)
    acts = activation_memory(arch, layout.tp, layout.pp, seq, mtp, cp=layout.cp)
    act = acts.total / GIB
    print(
        f"layout: TP {layout.tp} x PP {layout.pp} x CP {layout.cp} (DP {dp}), experts EP {layout.ep} x "
        f"ETP {layout.etp}, {layout.gpus} GPUs"
    )
    _print_rank_parameters(mem, args)
    print(
        f"activations at {seq} tokens (micro-batch 1, CP {layout.cp}: {seq // layout.cp} tokens per rank): "
        f"{act:.1f} GiB/rank (stored {acts.stored / GIB:.1f} + whole-sequence K/V {acts.gathered_kv / GIB:.1f})"
    )
    for name, value in ((f"full fine-tuning ({_optimizer(args)})", full), ("LoRA (frozen bf16 base)", lora)):
        fits = value + act <= _usable(args)
        print(
            f"{name}: {value:.1f} + {act:.1f} activations = {value + act:.1f} GiB/rank -> "
            f"{'fits' if fits else 'does NOT fit'} in {_usable(args):.0f} GiB ({args.reserve_gb:.0f} reserved)"
        )
    full_acts = activation_memory(arch, layout.tp, layout.pp, seq, mtp, cp=layout.cp, recompute="full").total / GIB
    fits = [value + full_acts <= _usable(args) for value in (full, lora)]
    print(
        f"with full recompute: {full_acts:.1f} GiB/rank of activations -> full fine-tuning {full + full_acts:.1f} "
        f"GiB/rank {'fits' if fits[0] else 'does NOT fit'}, LoRA {lora + full_acts:.1f} GiB/rank "
        f"{'fits' if fits[1] else 'does NOT fit'} (finetune.sh overrides: {FULL_RECOMPUTE_OVERRIDES})"
    )
    scores = unfused_score_bytes(arch, layout.tp, layout.cp, seq) / GIB
    print(
        "not counted: TransformerEngine's fused attention assumed (TE >= 2.16 for CP); the unfused local backend "
        f"adds >= {scores:.1f} GiB of scores"
    )
    return 0


def _recommend(arch, mtp, args, check) -> int:
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
            _, _, full, lora, _, _ = _evaluate(arch, mtp, layout, args)
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
class _Candidate:
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
    """Every valid layout on ``gpus`` GPUs with CP, as ``(mode, _Candidate)`` for full fine-tuning and LoRA."""
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.planning.parallel_plan import activation_memory, plan_rank_memory

    seq = _seq_length(args)
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
            yield mode, _with_activations(layout, parts, activations, _usable(args))


def _with_activations(layout: Layout, parts, activations, usable: float) -> _Candidate:
    """The layout with the recipe's selective recompute, or with full recompute where selective does not fit."""
    from mimo_v2_flash.planning.parallel_plan import GIB

    for recompute in ("selective", "full"):
        acts = activations(layout.tp, layout.pp, layout.cp, recompute)
        candidate = _Candidate(layout, parts, acts.total / GIB, acts.gathered_kv / GIB, recompute)
        if candidate.total <= usable:
            break
    return candidate


def _named(names: tuple[str, ...], values: tuple[float, ...]) -> tuple[tuple[str, float], ...]:
    """``(name, GiB)`` pairs of byte counts."""
    from mimo_v2_flash.planning.parallel_plan import GIB

    return tuple((name, value / GIB) for name, value in zip(names, values, strict=True))


def _preference(candidate: _Candidate, usable: float) -> tuple:
    """Sort key: layouts that fit ``usable`` GiB first, those with the recipe's selective recompute before those
    needing full recompute (a third more compute; CP costs communication only), then the most data-parallel (least
    TP x PP x CP), the least memory, ETP 1 (the recipe's); then the rest by least memory."""
    layout = candidate.layout
    parallel = layout.tp * layout.pp * layout.cp
    full = candidate.recompute == "full"
    if candidate.total <= usable:
        return (0, full, parallel, candidate.total, layout.etp)
    return (1, candidate.total, parallel, full, layout.etp)


def _recommend_long_context(arch, mtp, args, check) -> int:
    """For each GPU count and mode: the preferred layout at --seq-length, CP included, with its per-GPU memory
    (weights / gradients / optimizer state or frozen base / adapters, and activations)."""
    seq = _seq_length(args)
    label = f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)
    full_recompute = False
    for gpus in args.recommend:
        best: dict[str, _Candidate] = {}
        for mode, candidate in _candidates(arch, mtp, args, check, gpus):
            preferred = best.get(mode)
            if preferred is None or _preference(candidate, _usable(args)) < _preference(preferred, _usable(args)):
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


def _print_candidate(gpus: int, mode: str, candidate: _Candidate, label: str, args) -> None:
    parts = " + ".join(f"{name} {value:.1f}" for name, value in candidate.parts)
    fits = candidate.total <= _usable(args)
    print(
        f"{gpus:3d} GPUs, {mode:4s}: {candidate.layout.describe(True)} -> {candidate.states:6.1f} GiB/rank "
        f"({parts}; activations {label} {candidate.activations:.1f} (K/V {candidate.gathered_kv:.1f}), "
        f"recompute {candidate.recompute}; "
        f"total {candidate.total:.1f}; {'fits' if fits else 'does not fit'} {args.gpu_memory_gb:.0f} GiB "
        f"({args.reserve_gb:.0f} reserved) at {label})"
    )


if __name__ == "__main__":
    sys.exit(main())
