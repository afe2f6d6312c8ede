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
import sys
from pathlib import Path

from mimo_v2_flash.planning.layout_search import (
    DEFAULT_SEQ_LENGTH,
    FULL_RECOMPUTE_OVERRIDES,
    Layout,
    evaluate,
    recommend,
    recommend_long_context,
    seq_length,
    usable_gib,
)

DEFAULT_RECOMMEND_GPUS = (8, 16, 32, 64, 128, 256)


def _arch(args):
    from mimo_v2_flash.config import parse_architecture, released_family_configs

    if args.hf_model is None:
        return parse_architecture(released_family_configs()[args.model]), 3
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
    from mimo_v2_flash.checkpoint.validation import validate_checkpoint

    return validate_checkpoint(HFCheckpoint(args.hf_model))


def _long_context(args) -> bool:
    """Whether a sequence length or CP was asked for (then activations replace the headroom, and CP is shown)."""
    return args.seq_length is not None or args.cp is not None


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
            _check_seq_length(arch, seq_length(args))
        if args.recommend is not None:
            args.recommend = args.recommend or list(DEFAULT_RECOMMEND_GPUS)
            if _long_context(args):
                return recommend_long_context(arch, mtp, args, te_check)
            return recommend(arch, mtp, args, check_parallel_layout)
        (te_check if layout.cp > 1 else check_parallel_layout)(
            arch,
            layout.tp,
            layout.pp,
            layout.ep,
            layout.etp,
            cp=layout.cp,
            world_size=layout.gpus,
            seq_length=seq_length(args),
        )
    except (CheckpointError, MiMoV2FlashConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if _long_context(args):
        return _print_long_context_layout(arch, mtp, layout, args)
    return _print_layout(arch, mtp, layout, args)


def _print_layout(arch, mtp, layout: Layout, args) -> int:
    dp, mem, full, lora, full_fits, lora_fits = evaluate(arch, mtp, layout, args)
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

    seq = seq_length(args)
    dp, mem, full, lora, _, _ = evaluate(arch, mtp, layout, args)
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
        fits = value + act <= usable_gib(args)
        print(
            f"{name}: {value:.1f} + {act:.1f} activations = {value + act:.1f} GiB/rank -> "
            f"{'fits' if fits else 'does NOT fit'} in {usable_gib(args):.0f} GiB ({args.reserve_gb:.0f} reserved)"
        )
    full_acts = activation_memory(arch, layout.tp, layout.pp, seq, mtp, cp=layout.cp, recompute="full").total / GIB
    fits = [value + full_acts <= usable_gib(args) for value in (full, lora)]
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


if __name__ == "__main__":
    sys.exit(main())
