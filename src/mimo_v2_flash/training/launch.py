"""What ``finetune.sh`` prepares before and around Megatron-Bridge's training loop.

Before torchrun: the paths and every data record are checked, and an HF model is imported once, so bad input
fails with one line before any rank starts. Under torchrun, rank 0 does the file work (import, data staging,
tokenizer discovery) and every rank gets its result or its one-line error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

TORCHRUN_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def preflight(args: argparse.Namespace) -> str | None:
    """What can be checked before torchrun starts: paths and every data record.

    Imports no framework (``sft_data`` needs only the standard library): importing Megatron takes ~10 s, which
    the launcher should not spend twice.
    """
    from mimo_v2_flash.training import sft_data

    if args.hf_model is not None and not (args.hf_model / "config.json").is_file():
        return f"{args.hf_model}: not a Hugging Face checkpoint (no config.json)"
    if args.megatron_path is not None and not args.megatron_path.is_dir():
        return f"{args.megatron_path}: Megatron checkpoint directory not found"
    if args.tokenizer is not None and not any(args.tokenizer.glob("tokenizer*")):
        return f"{args.tokenizer}: no tokenizer files"
    try:
        sft_data.inspect_sft_file(args.data)
    except sft_data.SFTDataError as error:
        return str(error)
    return None


def _single_process_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}


class ImportFailed(Exception):
    """``convert_checkpoints.py import`` failed; it has printed its one-line reason."""


def ensure_pretrained(args: argparse.Namespace, output: Path) -> tuple[Path, Path | None]:
    """The Megatron checkpoint to start from and the HF directory it came from; imports an HF model once.

    Writes the built-in tiny HF checkpoint first when no model is given. Single process (``finetune.sh`` runs it
    before torchrun starts; under torchrun rank 0 does).
    """
    if args.megatron_path is not None:
        return args.megatron_path.resolve(), None
    hf_model = args.hf_model.resolve() if args.hf_model is not None else output / "tiny_hf"
    pretrained = output / "pretrained"
    if args.hf_model is None and not hf_model.is_dir():
        from mimo_v2_flash.checkpoint.output_dirs import replace_directory, staging_dir
        from mimo_v2_flash.tiny_checkpoint import write_tiny_checkpoint

        staging = staging_dir(hf_model)
        write_tiny_checkpoint(staging)
        replace_directory(staging, hf_model)
    if not pretrained.is_dir():
        import torch

        print(f"importing {hf_model} -> {pretrained}", flush=True)
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        command = [sys.executable, "-m", "mimo_v2_flash.conversion.cli", "import", "--hf-model", str(hf_model)]
        command += ["--megatron-path", str(pretrained), "--dtype", dtype]
        if subprocess.run(command, env=_single_process_env()).returncode:
            raise ImportFailed(hf_model)
    return pretrained, hf_model


def prepare_pretrained(args: argparse.Namespace, output: Path) -> tuple[Path, Path | None]:
    """:func:`ensure_pretrained` on rank 0; every rank gets its result."""
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.runtime.process_groups import run_on_rank0

    def on_this_rank() -> tuple[Path, Path | None]:
        try:
            return ensure_pretrained(args, output)
        except ImportFailed as failed:
            raise CheckpointError(f"{failed.args[0]}: import failed (see the error above)") from None

    return run_on_rank0(on_this_rank)


def launcher_preflight(args: argparse.Namespace) -> int:
    """Before torchrun: import an HF model if needed, so a bad checkpoint fails here with its one-line error."""
    output = args.output.resolve()
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        ensure_pretrained(args, output)
    except ImportFailed:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        return 2
    return 0


def prepare_data(data: Path, dataset_root: Path) -> tuple[Path, str]:
    """Rank 0 checks and links the data file (Megatron-Bridge indexes it there); the others then use it."""
    from mimo_v2_flash.runtime.process_groups import run_on_rank0
    from mimo_v2_flash.training.sft_data import stage_sft_data

    return run_on_rank0(lambda: stage_sft_data(data, dataset_root))


def find_tokenizer(args: argparse.Namespace, pretrained: Path, hf_model: Path | None) -> Path:
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir

    if args.tokenizer is not None:
        candidates = [args.tokenizer]
    else:
        candidates = [hf_model] if hf_model is not None else []
        candidates.append(latest_iteration_dir(pretrained) / "tokenizer")
    for candidate in candidates:
        if candidate is not None and any(candidate.glob("tokenizer*")):
            return candidate.resolve()
    raise CheckpointError(f"no HF tokenizer in {', '.join(map(str, candidates))}; pass --tokenizer DIR")
