"""Write the built-in tiny MiMo-V2-Flash as a Hugging Face checkpoint (random weights, every model feature).

    python examples/models/mimo_v2_flash/make_tiny_checkpoint.py --output /tmp/tiny_hf [--fp8] [--mtp-layers 1]
    python examples/models/mimo_v2_flash/make_tiny_checkpoint.py --output /tmp/tiny_v25 --family [--mxfp4]

``--fp8`` stores it like the released model: block FP8 projections, BF16 for the rest; ``--fp8-kv-layout`` picks
how K and V are quantized (default ``release``: the release's rule, each rank of a TP split at the full layers' KV
head count quantizing its fused rows: ``fused_kv_split`` on full layers, the plain grid on SWA and MTP layers).
``--family`` writes a MiMo-V2 family checkpoint instead (``MiMoV2ForCausalLM``, as MiMo-V2.5 stores it: a fused
``qkv_proj`` in 2 rank chunks quantized per chunk, vision / audio tower tensors); ``--mxfp4`` also stores the
routed experts in MXFP4, as MiMo-V2.6-Flash does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="directory to create (must not exist)")
    parser.add_argument("--fp8", action="store_true", help="block-FP8 checkpoint like the release")
    parser.add_argument(
        "--block-size", type=int, nargs=2, default=(16, 16), metavar=("ROWS", "COLS"), help="FP8 block"
    )
    parser.add_argument(
        "--fp8-kv-layout",
        default="release",
        help="K/V scale layout with --fp8: release, grid, fused_kv, fused_kv_split, per_rank:T or rank_fused:T "
        "(default release: fused_kv_split on full layers, the grid on SWA / MTP layers, as the release)",
    )
    parser.add_argument(
        "--family", action="store_true", help="MiMo-V2 family format (V2.5: fused qkv_proj, towers; implies FP8)"
    )
    parser.add_argument("--mxfp4", action="store_true", help="with --family: MXFP4 routed experts (V2.6-Flash)")
    parser.add_argument("--mtp-layers", type=int, default=1, help="number of MTP layers (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.output.exists():
        print(f"error: {args.output} already exists", file=sys.stderr)
        return 2
    if args.mxfp4 and not args.family:
        print("error: --mxfp4 applies to --family checkpoints", file=sys.stderr)
        return 2
    from mimo_v2_flash.tiny_checkpoint import write_fp8_checkpoint, write_tiny_checkpoint
    from mimo_v2_flash.tiny_family_checkpoint import family_tiny_config, write_family_checkpoint

    args.output.parent.mkdir(parents=True, exist_ok=True)
    cfg = family_tiny_config() if args.family else None
    with tempfile.TemporaryDirectory(dir=args.output.parent, prefix=".tiny-") as tmp:
        bf = write_tiny_checkpoint(Path(tmp) / "hf", cfg, mtp_layers=args.mtp_layers, seed=args.seed)
        final = bf
        if args.fp8 or args.family:
            final = write_fp8_checkpoint(bf, Path(tmp) / "fp8", tuple(args.block_size), args.fp8_kv_layout)
        if args.family:
            final = write_family_checkpoint(final, Path(tmp) / "family", mxfp4=args.mxfp4, seed=args.seed)
        shutil.move(str(final), str(args.output))
    kind = "MiMo-V2 family (MiMoV2ForCausalLM" + (", MXFP4 experts)" if args.mxfp4 else ")") if args.family else None
    print(f"tiny {kind or 'MiMo-V2-Flash'} ({'fp32' if final is bf else 'FP8'}) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
