"""Greedy generation with MiMo-V2-Flash on Megatron-Core (CPU or GPU).

Examples:
    python examples/models/mimo_v2_flash/generate.py --hf-model /ckpt/MiMo-V2-Flash --prompt "Hello" --max-new-tokens 8
    python examples/models/mimo_v2_flash/generate.py --megatron-path /ckpt/mimo_megatron --prompt-ids 1,2,3 \
        --dump-logits logits.safetensors

Prints the generated token ids (and the decoded text when a tokenizer is available). Runs as a plain
``python`` process; ``torchrun`` works too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime
from mimo_v2_flash.runtime.framework_logs import quiet_framework_logs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", type=Path, help="Hugging Face checkpoint directory (loaded through the bridge)")
    source.add_argument(
        "--megatron-path", type=Path, help="Megatron checkpoint written by convert_checkpoints.py import"
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="prompt text (tokenized with the checkpoint directory's tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument(
        "--dump-logits",
        type=Path,
        help="write the prompt's forward-pass logits to this safetensors file (tensor 'logits', float32 [len, vocab])",
    )
    for flag, meaning in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("etp", "expert tensor")):
        parser.add_argument(
            f"--{flag}",
            type=int,
            default=None if flag == "etp" else 1,
            help=f"{meaning}-parallel size (run under torchrun with that many processes)",
        )
    parser.add_argument(
        "--vp", type=int, default=None, help="virtual pipeline stages per pipeline rank (needs --pp > 1)"
    )
    parser.add_argument(
        "--cp", type=int, default=1, help="context-parallel size: the sequence split over N ranks (default 1)"
    )
    args = parser.parse_args(argv)
    if args.vp is not None and (args.pp < 2 or args.vp < 2):
        parser.error("--vp needs --pp >= 2 and a value >= 2")
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with quiet_framework_logs(), cpu_runtime():
        return generate(args)


def generate(args: argparse.Namespace) -> int:
    """Load the model and print the continuation of the prompt."""
    import torch

    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.runtime.inference import forward_logits, greedy_generate

    checkpoint_dir = args.hf_model or args.megatron_path
    if not checkpoint_dir.is_dir():
        print(f"error: {checkpoint_dir}: not a directory", file=sys.stderr)
        return 2
    tokenizer_dir = checkpoint_dir
    if args.megatron_path is not None:
        from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir

        try:
            tokenizer_dir = latest_iteration_dir(checkpoint_dir) / "tokenizer"
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    tokenizer = None
    if args.prompt is not None or (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = _load_tokenizer(tokenizer_dir, required=args.prompt is not None)
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(v) for v in args.prompt_ids.split(",") if v.strip()]
        except ValueError:
            print(f"error: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
            return 2
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    if not prompt_ids:
        print("error: the prompt is empty", file=sys.stderr)
        return 2

    layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "cp": args.cp}
    try:
        model = _load_model(args, layout)
    except (CheckpointError, MiMoV2FlashConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rank0 = torch.distributed.get_rank() == 0

    if args.dump_logits is not None and rank0:
        from safetensors.torch import save_file

        logits = forward_logits(model, prompt_ids).contiguous()
        args.dump_logits.parent.mkdir(parents=True, exist_ok=True)
        save_file({"logits": logits.cpu()}, str(args.dump_logits))
        print(f"logits {tuple(logits.shape)} written to {args.dump_logits}")
    if args.dump_logits is not None and not rank0:
        forward_logits(model, prompt_ids)  # every rank takes part in the collective forward
    eos = getattr(tokenizer, "eos_token_id", None)
    new_ids = greedy_generate(model, prompt_ids, args.max_new_tokens, eos_id=eos)
    if not rank0:
        return 0
    print("prompt ids:", ",".join(map(str, prompt_ids)))
    print("generated ids:", ",".join(map(str, new_ids)))
    if tokenizer is not None:
        print("generated text:", repr(tokenizer.decode(new_ids)))
    return 0


def _load_model(args: argparse.Namespace, layout: dict):
    """Check the layout against the model and the process count, then build and load the model."""
    import os

    from mimo_v2_flash.config import (
        MiMoV2FlashConfigError,
        load_config_dict,
        parse_architecture,
    )
    from mimo_v2_flash.conversion.megatron_checkpoint import load_megatron_checkpoint
    from mimo_v2_flash.planning.parallel_layout import check_parallel_layout
    from mimo_v2_flash.runtime.inference import DTYPES, load_from_hf
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

    arch = parse_architecture(load_config_dict(args.hf_model)) if args.hf_model is not None else None
    check_parallel_layout(arch, **layout, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if arch is not None and args.vp and arch.num_layers % (args.pp * args.vp):
        raise MiMoV2FlashConfigError(
            f"--pp {args.pp} x --vp {args.vp} does not divide num_hidden_layers={arch.num_layers}"
        )
    initialize_parallel_state(**layout, vp=args.vp)
    dtype = DTYPES[args.dtype]
    if args.hf_model is not None:
        return load_from_hf(args.hf_model, dtype, **layout, vp=args.vp)
    return load_megatron_checkpoint(args.megatron_path, dtype, **layout, vp=args.vp)


def _load_tokenizer(directory: Path, required: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        if required:
            raise SystemExit(f"error: {directory}: no usable tokenizer for --prompt ({error})") from None
        return None


if __name__ == "__main__":
    sys.exit(main())
