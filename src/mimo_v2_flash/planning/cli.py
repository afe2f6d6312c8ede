"""Per-rank memory of MiMo-V2-Flash for a parallel layout: parameters and optimizer state, full fine-tuning and LoRA.

    python plan_parallelism.py --tp 8 --pp 4 --ep 8 --gpus 32 [--gpu-memory-gb 80] [--hf-model DIR]
    python plan_parallelism.py --recommend 8 16 32 64      # best layouts for those H100 80 GB counts

Without --hf-model a released architecture is used (--model; 3 MTP layers). A layout "fits" when parameters +
gradients + optimizer state leave --activation-headroom-gb free per GPU; --recommend also prints the estimated
activations at 4k and 32k tokens (micro-batch 1, sequence parallel, selective recompute, as the recipe runs).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def _arch(args):
    from mimo_v2_flash.config import parse_architecture, released_family_configs

    if args.hf_model is None:
        return parse_architecture(released_family_configs()[args.model]), 3
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
    from mimo_v2_flash.checkpoint.validation import validate_checkpoint

    return validate_checkpoint(HFCheckpoint(args.hf_model))


def _evaluate(arch, mtp, tp, pp, ep, etp, gpus, args):
    from mimo_v2_flash.planning.parallel_plan import GIB, plan_rank_memory

    dp = gpus // (tp * pp)
    expert_dp = max(gpus // (ep * etp * pp), 1)
    mem = plan_rank_memory(arch, tp, pp, ep, etp, mtp, args.lora_rank)
    budget = args.gpu_memory_gb - args.activation_headroom_gb
    full = mem.full_finetune_bytes(dp, args.distributed_optimizer, expert_dp) / GIB
    lora = mem.lora_bytes() / GIB
    return dp, mem, full, lora, full <= budget, lora <= budget


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument(
        "--activation-headroom-gb", type=float, default=12.0, help="GiB kept for activations (default 12)"
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--distributed-optimizer",
        action="store_true",
        help="shard optimizer state over DP (always on with --recommend: the recipe uses it)",
    )
    parser.add_argument("--recommend", type=int, nargs="+", metavar="GPUS", help="search layouts for these GPU counts")
    args = parser.parse_args(argv)
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.planning.parallel_layout import check_parallel_layout
    from mimo_v2_flash.planning.parallel_plan import total_parameters

    try:
        arch, mtp = _arch(args)
        total, active = total_parameters(arch, mtp)
        print(f"model: {total / 1e9:.1f}B parameters ({active / 1e9:.1f}B active per token), {mtp} MTP layers")
        if args.recommend:
            return _recommend(arch, mtp, args, check_parallel_layout)
        check_parallel_layout(arch, args.tp, args.pp, args.ep, args.etp, world_size=args.gpus)
    except (CheckpointError, MiMoV2FlashConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dp, mem, full, lora, full_fits, lora_fits = _evaluate(
        arch, mtp, args.tp, args.pp, args.ep, args.etp, args.gpus, args
    )
    print(f"layout: TP {args.tp} x PP {args.pp} (DP {dp}), experts EP {args.ep} x ETP {args.etp}, {args.gpus} GPUs")
    print(
        f"per rank: {mem.dense_params / 1e9:.2f}B non-expert + {mem.expert_params / 1e9:.2f}B expert parameters; "
        f"LoRA r={args.lora_rank}: {mem.lora_params / 1e6:.1f}M trainable"
    )
    budget = args.gpu_memory_gb - args.activation_headroom_gb
    opt = "distributed optimizer" if args.distributed_optimizer else "optimizer state not sharded"
    print(
        f"full fine-tuning ({opt}): {full:.1f} GiB/rank -> "
        f"{'fits' if full_fits else 'does NOT fit'} in {budget:.0f} GiB"
    )
    print(
        f"LoRA (frozen bf16 base):    {lora:.1f} GiB/rank -> "
        f"{'fits' if lora_fits else 'does NOT fit'} in {budget:.0f} GiB"
    )
    return 0


def _recommend(arch, mtp, args, check) -> int:
    """For each GPU count: the valid layout with the least full-FT memory per rank (distributed optimizer, as the
    recipe), with its weights / gradients / optimizer state / activations; and the same for LoRA."""
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.planning.parallel_plan import GIB, activation_bytes, plan_rank_memory

    args.distributed_optimizer = True

    powers = [1, 2, 4, 8, 16, 32, 64]
    for gpus in args.recommend:
        best = {}
        for tp, pp, ep, etp in itertools.product([t for t in powers if t <= 8], powers, powers, [1, 2]):
            if tp * pp > gpus:
                continue
            try:
                check(arch, tp, pp, ep, etp, world_size=gpus)
            except MiMoV2FlashConfigError:
                continue
            dp, mem, full, lora, _, _ = _evaluate(arch, mtp, tp, pp, ep, etp, gpus, args)
            for mode, value in (("full", full), ("lora", lora)):
                key = (value, tp * pp, etp)  # least memory, then least model parallelism, then ETP 1 (the recipe's)
                if mode not in best or key < best[mode][0]:
                    best[mode] = (key, (tp, pp, ep, etp, dp))
        for mode in ("full", "lora"):
            (value, *_), (tp, pp, ep, etp, dp) = best[mode]
            acts = [activation_bytes(arch, tp, pp, seq, mtp) / GIB for seq in (4096, 32768)]
            fits = value + acts[0] <= args.gpu_memory_gb
            detail = ""
            if mode == "full":
                mem = plan_rank_memory(arch, tp, pp, ep, etp, mtp, args.lora_rank)
                parts = mem.full_finetune_parts(dp, True, max(gpus // (ep * etp * pp), 1))
                detail = "weights {:.1f} + grads {:.1f} + optimizer {:.1f}; ".format(*(p / GIB for p in parts))
            print(
                f"{gpus:3d} GPUs, {mode:4s}: TP {tp} PP {pp} EP {ep} ETP {etp} (DP {dp}) -> {value:6.1f} GiB/rank "
                f"({detail}activations 4k {acts[0]:.1f}, 32k {acts[1]:.1f}; "
                f"{'fits' if fits else 'does not fit'} {args.gpu_memory_gb:.0f} GiB at 4k)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
