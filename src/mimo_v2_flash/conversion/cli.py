"""Convert MiMo-V2-Flash checkpoints between Hugging Face and Megatron-Core.

  import       HF (FP8 release or BF16/FP32) -> Megatron distributed checkpoint
  export       Megatron checkpoint (or a fine-tuning --output dir) -> HF shards in hub layout (BF16, FP32, or the
               source's own block-FP8 format with --dtype fp8)
  inspect-fp8  report the FP8 scale layout of every tensor kind and the evidence for it

Examples:
  python convert_checkpoints.py import --hf-model /ckpt/MiMo-V2-Flash --megatron-path /ckpt/mimo_mcore
  python convert_checkpoints.py export --hf-model /ckpt/MiMo-V2-Flash --megatron-path /ckpt/mimo_mcore \\
      --hf-path /ckpt/mimo_export_bf16
  python convert_checkpoints.py export --hf-model /ckpt/MiMo-V2-Flash --megatron-path /runs/sft \\
      --hf-path /ckpt/mimo_sft_fp8 --dtype fp8
  python convert_checkpoints.py inspect-fp8 --hf-model /ckpt/MiMo-V2-Flash

The FP8 scale layout of each K/V pair (grid, fused_kv, fused_kv_split, per_rank:T) is decided from its data;
--fp8-kv-layout forces one, and a forced layout the data contradicts is an error.

Outputs are written to a temporary sibling directory and renamed at the end: a failed run leaves nothing.
Expected problems (bad or truncated files, missing tensors or scales, wrong shapes) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimo_v2_flash.checkpoint.kv_layout_names import KV_LAYOUT_CHOICES
from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime
from mimo_v2_flash.runtime.framework_logs import quiet_framework_logs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="HF -> Megatron distributed checkpoint")
    imp.add_argument("--hf-model", type=Path, required=True, help="HF checkpoint directory (FP8 or BF16/FP32)")
    imp.add_argument("--megatron-path", type=Path, required=True, help="output Megatron checkpoint directory")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    imp.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    imp.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    imp.add_argument(
        "--cp",
        type=int,
        default=1,
        help="context-parallel size of the processes (default 1); the checkpoint does not depend on it",
    )
    imp.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stored dtype (default bfloat16)"
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_fp8_kv_layout_flag(imp)

    exp = commands.add_parser("export", help="Megatron -> HF shards (hub layout)")
    exp.add_argument(
        "--hf-model",
        type=Path,
        required=True,
        help="the original HF checkpoint (config, tokenizer and remote code are carried over)",
    )
    exp.add_argument(
        "--megatron-path",
        type=Path,
        required=True,
        help="Megatron checkpoint, or a fine-tuning output directory (its latest iteration is used)",
    )
    exp.add_argument("--hf-path", type=Path, required=True, help="output HF directory")
    exp.add_argument(
        "--dtype",
        choices=["bfloat16", "float32", "fp8"],
        default="bfloat16",
        help="weight dtype (default bfloat16); fp8: the --hf-model checkpoint's own block-FP8 format (FP8 tensors in "
        "the scale layouts the import decided, the rest in the source's dtypes; a BF16 source gets the release's)",
    )
    exp.add_argument(
        "--fp8-serve-tp",
        type=int,
        default=None,
        metavar="T",
        help="with --dtype fp8: quantize K/V per rank exactly as a vLLM / SGLang server at attention TP T reads them "
        "(default: the source's layout)",
    )
    exp.add_argument(
        "--adapter-path",
        type=Path,
        default=None,
        help="LoRA runs only: also write the adapters alone here as a PEFT adapter in HF naming "
        "(the main output is always the merged model)",
    )
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    ins = commands.add_parser("inspect-fp8", help="FP8 scale layout per tensor kind, with evidence")
    ins.add_argument("--hf-model", type=Path, required=True, help="HF checkpoint directory")
    add_fp8_kv_layout_flag(ins)
    return parser.parse_args(argv)


def add_fp8_kv_layout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fp8-kv-layout",
        default="auto",
        metavar="{" + ",".join(KV_LAYOUT_CHOICES) + "}",
        help="FP8 scale layout of the K/V projections (default auto: decided per layer from the data)",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with quiet_framework_logs(), cpu_runtime():
        return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command (inside the launcher's log and CPU-runtime scopes)."""
    import torch

    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.conversion.commands import (
        export_checkpoint,
        import_checkpoint,
        inspect_fp8,
        is_rank0,
        return_freed_memory_to_the_system,
    )

    return_freed_memory_to_the_system()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "fp8": torch.bfloat16}[
        getattr(args, "dtype", "bfloat16")
    ]
    try:
        if args.command == "inspect-fp8":
            print("\n".join(inspect_fp8(args.hf_model, args.fp8_kv_layout)))
            return 0
        from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

        if args.command == "import":
            layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "cp": args.cp}
            summary = import_checkpoint(
                args.hf_model,
                args.megatron_path,
                dtype,
                layout,
                overwrite=args.overwrite,
                fp8_kv_layout=args.fp8_kv_layout,
            )
            action, target = "imported", args.megatron_path
        else:
            initialize_parallel_state()
            summary = export_checkpoint(
                args.hf_model,
                args.megatron_path,
                args.hf_path,
                dtype,
                overwrite=args.overwrite,
                max_shard_gb=args.max_shard_gb,
                adapter_out=args.adapter_path,
                fp8=args.dtype == "fp8",
                fp8_serve_tp=args.fp8_serve_tp,
            )
            action, target = "exported", args.hf_path
    except (CheckpointError, MiMoV2FlashConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if is_rank0() and summary:
        seconds = max(summary["seconds"], 1e-9)
        print(
            f"{action} {summary['tensors']} tensors ({summary['bytes'] / 1024**2:.1f} MiB) in {seconds:.1f} s "
            f"({summary['tensors'] / seconds:.0f} tensors/s, {summary['bytes'] / seconds / 1024**2:.1f} MB/s) "
            f"-> {target}"
            + _fp8_note(summary.get("fp8_layouts"), summary.get("fp8_format"))
            + _towers_note(summary.get("towers"))
        )
    return 0


def _fp8_note(layouts: dict[str, int] | None, written_format: str | None = None) -> str:
    """The FP8 scale layouts the import used or the export wrote (tensors per layout), for the summary line."""
    if not layouts:
        return f"; {written_format}" if written_format else ""
    note = "; FP8 scale layouts: " + ", ".join(f"{kind} x{count}" for kind, count in layouts.items())
    return f"; {written_format}{note}" if written_format else note


def _towers_note(towers: dict[str, int] | None) -> str:
    """MiMo-V2.5's vision / audio tensors, which the language model does not hold, for the summary line."""
    if not towers:
        return ""
    parts = ", ".join(f"{prefix} x{count}" for prefix, count in towers.items())
    return f"; left alone (vision / audio towers, not part of the language model): {parts}"


if __name__ == "__main__":
    sys.exit(main())
