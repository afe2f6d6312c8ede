"""Command line: ``python -m neuron_export {inspect,prepare,plan,compile}`` (console script ``neuron-export``).

Expected problems (bad or non-MiMo checkpoints, missing tensors or scales, infeasible layouts, no Neuron SDK)
print one line starting with ``error: `` on stderr and exit with code 2; outputs are written to a hidden
sibling and renamed at the end, so a failed run leaves nothing behind. Heavy modules are imported only by the
subcommand that needs them (``--help`` imports none).
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """typical flow (trn2.48xlarge):
  neuron_export inspect --hf-path /ckpt/MiMo-V2-Flash
  neuron_export plan    --hf-path /ckpt/MiMo-V2-Flash --tp 64 --ep 64 --moe-tp 1 --batch-size 32 --seq-len 8192
  neuron_export prepare --hf-path /ckpt/MiMo-V2-Flash --output /ckpt/mimo_nxdi
  neuron_export compile --prepared /ckpt/mimo_nxdi --compiled-path /ckpt/mimo_nxdi_tp64_ep64"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_layout_flags(parser: argparse.ArgumentParser) -> None:
    from neuron_export.layout import INSTANCES, Layout  # pure arithmetic, cheap to import

    defaults = Layout()
    group = parser.add_argument_group("layout (NxDI MoENeuronConfig)")
    group.add_argument("--tp", type=positive_int, default=defaults.tp, help="tp_degree (default %(default)s)")
    group.add_argument(
        "--ep",
        type=positive_int,
        default=defaults.ep,
        help="moe_ep_degree: experts split over this many ranks (default %(default)s)",
    )
    group.add_argument(
        "--moe-tp",
        type=positive_int,
        default=defaults.moe_tp,
        help="moe_tp_degree; moe_tp x ep must equal tp (default %(default)s)",
    )
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="(default %(default)s)")
    group.add_argument("--seq-len", type=positive_int, default=defaults.seq_len, help="(default %(default)s)")
    group.add_argument(
        "--max-context-length", type=positive_int, default=None, help="prompt length bucket (default: seq-len)"
    )
    group.add_argument(
        "--logical-nc-config",
        type=int,
        choices=(1, 2),
        default=defaults.logical_nc_config,
        help="logical NeuronCore config, LNC (default %(default)s)",
    )
    group.add_argument("--instance", default=defaults.instance, choices=tuple(INSTANCES), help="(default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from mimo_v2_flash.checkpoint.kv_layout_names import KV_LAYOUT_CHOICES

    parser = argparse.ArgumentParser(
        prog="neuron_export",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inspect,prepare,plan,compile}")

    inspect = commands.add_parser("inspect", help="describe a checkpoint from its headers and list every problem")
    inspect.add_argument("--hf-path", required=True, help="HF checkpoint directory (hub layout or a prepare output)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    prepare = commands.add_parser("prepare", help="write the NxDI-ready BF16 checkpoint (FP8 dequantized exactly)")
    prepare.add_argument("--hf-path", required=True, help="source HF checkpoint (FP8 release or BF16/FP32 export)")
    prepare.add_argument("--output", required=True, help="output directory (written atomically)")
    prepare.add_argument(
        "--keep-mtp", action="store_true", help="write the MTP layers to OUTPUT/mtp/ instead of dropping them"
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing output (only on success)")
    prepare.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="output shard size in GB (default %(default)s)"
    )
    prepare.add_argument(
        "--fp8-kv-layout",
        default="auto",
        metavar="{" + ",".join(KV_LAYOUT_CHOICES) + "}",
        help="FP8 scale layout of the K/V projections (default auto: decided per layer from the data, "
        "as convert_checkpoints.py import does)",
    )

    plan = commands.add_parser("plan", help="check an NxDI layout and print per-rank HBM, host RAM and disk needs")
    plan.add_argument("--hf-path", required=True, help="checkpoint directory (or, with --config-only, config.json)")
    plan.add_argument("--config-only", action="store_true", help="read only config.json (no weights needed)")
    _add_layout_flags(plan)

    compile_ = commands.add_parser(
        "compile", help="compile with NxDI's MiMo adapter + smoke test, or write a trn2 bundle"
    )
    compile_.add_argument("--prepared", required=True, help="output of 'prepare'")
    compile_.add_argument("--compiled-path", required=True, help="where the compiled model / ready-to-run bundle go")
    _add_layout_flags(compile_)
    sdk = compile_.add_argument_group("Neuron SDK")
    sdk.add_argument(
        "--neuron-python",
        default=None,
        help="interpreter of the Neuron SDK venv (default: this one), e.g. "
        "/opt/aws_neuronx_venv_pytorch_2_9_nxd_inference/bin/python",
    )
    sdk.add_argument(
        "--adapter-src",
        default=None,
        help="NxDI contrib/models/MiMo-V2-Flash/src (default: $NXDI_CONTRIB_MIMO_V2_FLASH_SRC)",
    )
    sdk.add_argument("--prompt", default="Hello! Please introduce yourself in one sentence.", help="smoke-test prompt")
    sdk.add_argument("--max-new-tokens", type=positive_int, default=20, help="smoke-test length (default %(default)s)")
    compile_.add_argument(
        "--overwrite", action="store_true", help="replace an existing compiled path (only on success)"
    )
    compile_.add_argument(
        "--verify-checksums", action="store_true", help="re-hash the prepared files (reads all data)"
    )
    return parser


def _layout(args: argparse.Namespace):
    from neuron_export.layout import Layout

    return Layout(
        tp=args.tp,
        ep=args.ep,
        moe_tp=args.moe_tp,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        logical_nc_config=args.logical_nc_config,
        instance=args.instance,
        max_context_length=args.max_context_length,
    )


def _inspect(args: argparse.Namespace) -> None:
    from neuron_export.errors import ExportError
    from neuron_export.inspection import inspect_checkpoint
    from neuron_export.report_text import render

    report = inspect_checkpoint(args.hf_path)
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    if report.problems:
        more = f" (+{len(report.problems) - 1} more listed above)" if len(report.problems) > 1 else ""
        raise ExportError(f"{report.problems[0]}{more}")


def _prepare(args: argparse.Namespace) -> None:
    from neuron_export.prepare import prepare
    from neuron_export.report_text import human_bytes

    summary = prepare(args.hf_path, args.output, keep_mtp=args.keep_mtp, overwrite=args.overwrite,
                      max_shard_bytes=int(args.max_shard_gb * 1e9), fp8_kv_layout=args.fp8_kv_layout)  # fmt: skip
    fp8 = ", FP8 dequantized" if summary["fp8_source"] else ""
    print(f"prepared {summary['tensors']} tensors ({human_bytes(summary['bytes'])} BF16, {summary['shards']} "
          f"shard(s){fp8}; MTP {summary['mtp']}) in {summary['seconds']:.1f} s -> {summary['output']}")  # fmt: skip
    if summary["fp8_layouts"]:
        print("FP8 scale layouts: " + ", ".join(f"{kind} x{count}" for kind, count in summary["fp8_layouts"].items()))


def _plan(args: argparse.Namespace) -> None:
    from neuron_export.errors import ExportError
    from neuron_export.plan import plan

    result = plan(args.hf_path, _layout(args), config_only=args.config_only)
    print(result.text)
    if result.problems:
        raise ExportError("layout infeasible: " + "; ".join(result.problems))


def _compile(args: argparse.Namespace) -> None:
    from neuron_export.compile import compile_prepared

    result = compile_prepared(args.prepared, args.compiled_path, _layout(args), args.neuron_python,
                              args.adapter_src, args.prompt, args.max_new_tokens, args.overwrite,
                              args.verify_checksums)  # fmt: skip
    print(f"compiled -> {result.compiled_path}; smoke generation: {result.smoke['text']!r}")


COMMANDS = {"inspect": _inspect, "prepare": _prepare, "plan": _plan, "compile": _compile}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m neuron_export`` and the ``neuron-export`` console script."""
    args = build_parser().parse_args(argv)
    from neuron_export.project import user_errors

    expected = (*user_errors(), OSError)  # OSError: unreadable input, unwritable output, disk full
    try:
        COMMANDS[args.command](args)
        return 0
    except expected as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
