"""Fine-tune MiMo-V2-Flash with Megatron-Bridge's training loop (full SFT or LoRA). Launch with finetune.sh.

With no arguments it trains the built-in tiny model on the shipped chat dataset (data/tiny_sft.jsonl) for a
few dozen steps on whatever this machine has (CPU: gloo and fp32; GPUs: NCCL, bf16 and TransformerEngine).

Examples:
  bash finetune.sh
  bash finetune.sh --hf-model /ckpt/MiMo-V2-Flash --data chat.jsonl --output /runs/sft --tp 8 --ep 8
  bash finetune.sh --megatron-path /ckpt/mimo_mcore --data chat.jsonl --peft lora --output /runs/lora
  torchrun --no-python --nproc-per-node 2 finetune.sh --tp 2 logger.log_interval=5

Any Megatron-Bridge config key can be overridden after the flags in Hydra syntax (section.key=value), as with
upstream recipes: train.*, model.*, optimizer.*, scheduler.*, checkpoint.*, logger.*, dataset.*, ...
An --hf-model checkpoint is first imported through the bridge into OUTPUT/pretrained (once). Running again
with the same --output resumes from its latest checkpoint. Export the result with
  python convert_checkpoints.py export --hf-model HF_DIR --megatron-path OUTPUT --hf-path HF_OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimo_v2_flash.runtime.framework_logs import quiet_framework_logs
from mimo_v2_flash.training.launch import (
    find_tokenizer,
    launcher_preflight,
    preflight,
    prepare_data,
    prepare_pretrained,
)


def parse_args(
    argv: list[str] | None = None, default_data: Path | None = None
) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf-model", type=Path, help="pretrained HF checkpoint (FP8 or BF16), imported on the fly")
    source.add_argument("--megatron-path", type=Path, help="pretrained Megatron checkpoint (convert_checkpoints.py)")
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data,
        required=default_data is None,
        help="JSONL: chat 'messages' or 'input'/'output'" + (f" (default: {default_data})" if default_data else ""),
    )
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--output", type=Path, default=Path("mimo_v2_flash_finetune"), help="run directory")
    parser.add_argument("--train-iters", type=int, default=None, help="optimizer steps (default 40; 100 with a model)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-6 SFT, 1e-4 LoRA)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences per micro batch (default 1)")
    parser.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default 1)")
    parser.add_argument(
        "--cp", type=int, default=1, help="context-parallel size: each sequence split over N ranks (default 1)"
    )
    parser.add_argument("--peft", choices=["none", "lora"], default="none", help="full fine-tuning or LoRA")
    parser.add_argument("--lora-dim", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (update scaled by alpha/rank)")
    parser.add_argument("--mtp-loss-scale", type=float, default=0.1, help="MTP loss weight; 0 disables MTP training")
    parser.add_argument(
        "--router-bias-update-rate", type=float, default=0.0, help="noaux_tc expert-bias update rate (0: off)"
    )
    parser.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="MoE load-balancing aux loss weight")
    parser.add_argument("--moe-z-loss-coeff", type=float, default=None, help="MoE router z-loss weight")
    parser.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (default: at end)")
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    parser.add_argument(
        "--backend",
        choices=["auto", "te", "local"],
        default="auto",
        help="model backend: TransformerEngine (te), pure torch (local) or auto (TE where CUDA and TE are usable)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved ConfigContainer as YAML and exit (no training, no weights read; --hf-model may "
        "hold only config.json and a tokenizer)",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes finetune.sh starts (torchrun)")
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def recipe_config(args, pretrained, dataset_root, data_format, tokenizer, output, backend, model=None):
    """The recipe's ``ConfigContainer`` for these command-line arguments."""
    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_recipe import mimo_v2_flash_finetune_config

    tiny = args.hf_model is None and args.megatron_path is None
    return mimo_v2_flash_finetune_config(
        pretrained_checkpoint=pretrained,
        dataset_root=dataset_root,
        data_format=data_format,
        tokenizer=tokenizer,
        output_dir=output,
        peft=args.peft,
        train_iters=args.train_iters or (40 if tiny else 100),
        lr=args.lr if args.lr is not None else (3e-3 if tiny else None),
        micro_batch_size=args.micro_batch_size or 1,
        global_batch_size=args.global_batch_size or 8,
        seq_length=args.seq_length or (64 if tiny else 2048),
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        etp=args.etp,
        cp=args.cp,
        mtp_loss_scale=args.mtp_loss_scale,
        save_interval=args.save_interval,
        router_bias_update_rate=args.router_bias_update_rate,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        lora_dim=args.lora_dim,
        lora_alpha=args.lora_alpha,
        seed=args.seed,
        backend=backend,
        model=model,
    )


def apply_overrides(cfg, overrides: list[str]) -> bool:
    """Hydra-style ``section.key=value`` overrides; False (after a one-line error) if one is invalid."""
    if not overrides:
        return True
    from megatron.bridge.training.utils.omegaconf_utils import OverridesError, process_config_with_overrides

    try:
        process_config_with_overrides(cfg, cli_overrides=overrides)
    except OverridesError as error:
        print(f"finetune: {str(error).splitlines()[0]}", file=sys.stderr)
        return False
    return True


def print_config(args: argparse.Namespace, overrides: list[str], backend: str) -> int:
    """Print the resolved ``ConfigContainer`` as YAML, reading configs only (no weights, no process group).

    The provider comes from the HF ``config.json`` (MTP layers counted from the index, if there is one) or from
    the Megatron checkpoint's run config. With ``--backend te`` it is the GPU configuration on any host;
    otherwise what this host would run.
    """
    import json

    from megatron.bridge.training.model_load_save import load_model_config

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge import provider_from_architecture
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError, count_mtp_layers
    from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir
    from mimo_v2_flash.config import (
        MiMoV2FlashConfigError,
        load_config_dict,
        parse_architecture,
    )
    from mimo_v2_flash.runtime.cpu_adaptations import apply_cpu_training_settings

    output = args.output.resolve()
    try:
        if args.megatron_path is not None:
            model, _ = load_model_config(str(latest_iteration_dir(args.megatron_path)))
            source = args.megatron_path
        else:
            source = args.hf_model or output / "tiny_hf"
            if args.hf_model is None:
                from mimo_v2_flash.tiny_checkpoint import tiny_config

                raw = tiny_config()
            else:
                raw = load_config_dict(args.hf_model)
            index = Path(source) / "model.safetensors.index.json"
            keys = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
            model = provider_from_architecture(parse_architecture(raw), mtp_num_layers=count_mtp_layers(keys))
        tokenizer = args.tokenizer or source
        cfg = recipe_config(args, source, output / "data", "chat", tokenizer, output, backend, model=model)
    except (CheckpointError, MiMoV2FlashConfigError) as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    if args.backend != "te":
        apply_cpu_training_settings(cfg)
    if not apply_overrides(cfg, overrides):
        return 2
    cfg.print_yaml()
    return 0


def main(argv: list[str] | None = None, default_data: Path | None = None) -> int:
    """The ``finetune.sh`` command line; ``default_data`` is the ``--data`` file used when none is given."""
    args, overrides = parse_args(argv, default_data)
    unknown = [item for item in overrides if "=" not in item or item.startswith("-")]
    if unknown:
        print(f"finetune: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    with quiet_framework_logs():
        return run(args, overrides)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Check the inputs, then print the configuration or train (inside the launcher's scopes)."""
    problem = preflight(args)
    if problem is not None:
        print(f"finetune: {problem}", file=sys.stderr)
        return 2
    if args.preflight:
        return 0 if args.print_config else launcher_preflight(args)
    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import transformer_engine_usable
    from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime
    from mimo_v2_flash.runtime.process_groups import init_single_process_group

    backend = args.backend
    if backend == "auto":
        backend = "te" if transformer_engine_usable() else "local"
    elif backend == "te" and not transformer_engine_usable() and not args.print_config:
        print("finetune: --backend te needs CUDA and transformer_engine (use --backend local)", file=sys.stderr)
        return 2
    if args.print_config:
        return print_config(args, overrides, backend)
    with cpu_runtime(training=True, peft=True):
        init_single_process_group()
        return train(args, overrides, backend)


def train(args: argparse.Namespace, overrides: list[str], backend: str) -> int:
    """Prepare the pretrained checkpoint, tokenizer and data on rank 0, then run Megatron-Bridge's fine-tuning."""
    from megatron.bridge.training.finetune import finetune

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_step import forward_step
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from mimo_v2_flash.runtime.cpu_adaptations import apply_cpu_training_settings, cuda_literals_on_cpu
    from mimo_v2_flash.runtime.process_groups import shutdown_at_exit
    from mimo_v2_flash.training.sft_data import SFTDataError

    shutdown_at_exit()
    output = args.output.resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
        pretrained, hf_model = prepare_pretrained(args, output)
        tokenizer = find_tokenizer(args, pretrained, hf_model)
        dataset_root, data_format = prepare_data(args.data, output / "data")
        cfg = recipe_config(args, pretrained, dataset_root, data_format, tokenizer, output, backend)
    except (CheckpointError, MiMoV2FlashConfigError, SFTDataError) as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    apply_cpu_training_settings(cfg)
    if not apply_overrides(cfg, overrides):
        return 2
    with cuda_literals_on_cpu():
        finetune(cfg, forward_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
