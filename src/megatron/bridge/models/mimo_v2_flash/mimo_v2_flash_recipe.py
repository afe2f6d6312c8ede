"""MiMo-V2-Flash fine-tuning recipe: a Megatron-Bridge ``ConfigContainer`` for full SFT or LoRA.

In the style of upstream ``megatron.bridge.recipes`` (``_sft_common`` / ``_peft_common``), built here because
importing ``megatron.bridge.recipes`` pulls in the diffusion recipes and their ``diffusers`` dependency. The
model provider is the one stored with the pretrained Megatron checkpoint (written by
``convert_checkpoints.py import`` through the bridge), so its architecture is exactly the imported one.

Routing follows the original training: sigmoid scores in fp32 with the expert-bias (noaux_tc) term; the bias
update that the original training applied is available through ``router_bias_update_rate`` and off by default.

The recipe is the GPU configuration, whatever host builds it, modelled on Megatron-Bridge 0.6.2's large-MoE
recipes (DeepSeek-V3, Qwen3-MoE): bf16, the TransformerEngine spec, grouped GEMM, the alltoall dispatcher with
permute fusion, TE cross-entropy fusion, the distributed optimizer with overlapped reduce / gather, expert tensor
parallelism 1, sequence parallelism with TP, selective recompute of core attention and the MoE activation. A
launcher on a host without CUDA applies its changes in one place
(``mimo_v2_flash.runtime.cpu_adaptations.apply_cpu_training_settings``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.bridge.data.builders import GPTSFTDatasetConfig
from megatron.bridge.data.sft_processing import ChatSFTPreprocessingConfig, PromptCompletionSFTPreprocessingConfig
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    DistributedInitConfig,
    LoggerConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.training.model_load_save import load_model_config

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import GPU_MODEL_SETTINGS, LOCAL_BACKEND_SETTINGS
from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir
from mimo_v2_flash.planning.parallel_layout import check_parallel_layout

LORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def mimo_v2_flash_lora(dim: int = 16, alpha: int = 32) -> LoRA:
    """LoRA on every attention and MLP linear, routed experts and MTP layers included (router excluded)."""
    return LoRA(
        target_modules=list(LORA_TARGETS),
        dim=dim,
        alpha=alpha,
        dropout=0.0,
        lora_A_init_method="xavier",
        lora_B_init_method="zero",
    )


def mimo_v2_flash_finetune_config(
    pretrained_checkpoint: str | Path,
    dataset_root: str | Path,
    data_format: str,
    tokenizer: str | Path,
    output_dir: str | Path,
    peft: str = "none",
    train_iters: int = 100,
    lr: float | None = None,
    micro_batch_size: int = 1,
    global_batch_size: int = 8,
    seq_length: int = 2048,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    cp: int = 1,
    mtp_loss_scale: float = 0.1,
    save_interval: int | None = None,
    router_bias_update_rate: float = 0.0,
    moe_aux_loss_coeff: float = 0.0,
    moe_z_loss_coeff: float | None = None,
    lora_dim: int = 16,
    lora_alpha: int = 32,
    seed: int = 1234,
    backend: str = "te",
    model=None,
) -> ConfigContainer:
    """Fine-tuning configuration for MiMo-V2-Flash.

    Args:
        pretrained_checkpoint: Megatron checkpoint with the base weights (and the provider in its run config).
        dataset_root: Directory holding ``training.jsonl`` (see ``sft_data.stage_sft_data``).
        data_format: "chat" (``messages`` records) or "prompt_completion" (``input``/``output`` records).
        tokenizer: Hugging Face tokenizer directory.
        output_dir: Checkpoints go to ``output_dir`` (training resumes from it), logs to ``output_dir/tb_logs``.
        peft: "none" (full SFT) or "lora".
        train_iters: Optimizer steps.
        lr: Peak learning rate (default 5e-6 full SFT, 1e-4 LoRA, as upstream recipes).
        micro_batch_size: Sequences per micro batch.
        global_batch_size: Sequences per optimizer step.
        seq_length: Tokens per sequence (records are padded or truncated to it).
        tp: Tensor-parallel size.
        pp: Pipeline-parallel size.
        ep: Expert-parallel size.
        etp: Expert tensor-parallel size (default 1, as upstream's large-MoE recipes: experts split by EP only).
        cp: Context-parallel size (each sequence split over ``cp`` ranks; local attention backend only).
        mtp_loss_scale: Weight of the MTP loss (0 leaves the MTP layers untrained).
        save_interval: Checkpoint every N iterations (default: only at the end).
        router_bias_update_rate: Rate of the aux-loss-free expert-bias update (0: bias kept as loaded).
        moe_aux_loss_coeff: Load-balancing aux loss weight (0: none, as the original noaux_tc training).
        moe_z_loss_coeff: Router z-loss weight (None: off).
        lora_dim: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / dim).
        seed: Random seed of the run.
        backend: "te" (TransformerEngine, the GPU configuration) or "local" (the pure-torch backend: TE-only
            features off).
        model: The model provider to use instead of the one stored with ``pretrained_checkpoint`` (e.g. one built
            from an HF ``config.json`` to review a configuration without weights).

    Returns:
        The ``ConfigContainer`` for ``megatron.bridge.training.finetune.finetune``.
    """
    if peft not in ("none", "lora"):
        raise ValueError(f"peft must be 'none' or 'lora', got {peft!r}")
    if backend not in ("te", "local"):
        raise ValueError(f"backend must be 'te' or 'local', got {backend!r}")
    output_dir = Path(output_dir)
    if model is None:
        model, _ = load_model_config(str(latest_iteration_dir(pretrained_checkpoint)))
    model.tensor_model_parallel_size = tp
    model.pipeline_model_parallel_size = pp
    model.expert_model_parallel_size = ep
    model.expert_tensor_parallel_size = etp if etp is not None else 1
    model.context_parallel_size = cp
    model.calculate_per_token_loss = cp > 1
    model.virtual_pipeline_model_parallel_size = None
    # Megatron-Core requires sequence parallelism to train MoE layers with tensor parallelism
    model.sequence_parallel = tp > 1
    model.params_dtype = model.pipeline_dtype = torch.bfloat16
    model.bf16, model.fp16 = True, False
    model.seq_length = seq_length
    _gpu_model_settings(model)
    if backend == "local":
        model.use_transformer_engine = False
        for name, value in LOCAL_BACKEND_SETTINGS.items():
            setattr(model, name, value)
    model.mtp_loss_scaling_factor = mtp_loss_scale
    # Refuse, before any process group exists, a context-parallel run that cannot be exact.
    check_parallel_layout(None, cp=cp, seq_length=seq_length, transformer_engine=backend == "te")
    model.moe_router_dtype = "fp32"
    model.moe_router_bias_update_rate = router_bias_update_rate
    model.moe_aux_loss_coeff = moe_aux_loss_coeff
    model.moe_router_load_balancing_type = "seq_aux_loss" if moe_aux_loss_coeff else "none"
    model.moe_z_loss_coeff = moe_z_loss_coeff

    lr = lr if lr is not None else (1e-4 if peft == "lora" else 5e-6)
    cfg = ConfigContainer(
        model=model,
        train=TrainingConfig(
            train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size
        ),
        validation=ValidationConfig(eval_interval=None, eval_iters=0),
        optimizer=OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=lr / 10,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.98,
            clip_grad=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
            use_distributed_optimizer=True,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style="cosine",
            lr_warmup_iters=min(10, train_iters // 10),
            lr_decay_iters=train_iters,
            start_weight_decay=0.0,
            end_weight_decay=0.0,
        ),
        ddp=DistributedDataParallelConfig(
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=True,
            overlap_grad_reduce=True,
            overlap_param_gather=True,
            # Under CP an SFT rank may hold only masked tokens: Bridge requires per-token loss sums, not averages.
            average_in_collective=cp == 1,
        ),
        dataset=GPTSFTDatasetConfig(
            seq_length=seq_length,
            dataset_root=str(dataset_root),
            preprocessing=preprocessing_for(data_format),
            dataloader_type="batch",
            # The allgather token dispatcher exchanges equally shaped token blocks across expert-parallel ranks,
            # which read different batches: pad every sequence to seq_length there.
            dataset_kwargs={"pad_to_max_length": True} if ep > 1 else None,
            do_validation=False,
            do_test=False,
            seed=seed,
        ),
        logger=LoggerConfig(log_interval=1, tensorboard_dir=str(output_dir / "tb_logs")),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tokenizer)),
        checkpoint=CheckpointConfig(
            save=str(output_dir),
            load=str(output_dir),
            pretrained_checkpoint=str(pretrained_checkpoint),
            save_interval=save_interval or train_iters,
            ckpt_format="torch_dist",
            fully_parallel_save=True,
        ),
        rng=RNGConfig(seed=seed),
        dist=DistributedInitConfig(),
        mixed_precision="bf16_mixed",
        peft=mimo_v2_flash_lora(lora_dim, lora_alpha) if peft == "lora" else None,
    )
    return cfg


def preprocessing_for(kind: str):
    """Megatron-Bridge's preprocessing for a record format (loss on the assistant turns / on the output)."""
    if kind == "chat":
        return ChatSFTPreprocessingConfig(loss_mode="assistant")
    return PromptCompletionSFTPreprocessingConfig(
        prompt_column="input", completion_column="output", separator=" ", loss_mode="completion"
    )


def _gpu_model_settings(model) -> None:
    """The model settings of upstream's large-MoE GPU recipes (see the module docstring)."""
    model.use_transformer_engine = True
    for name, value in GPU_MODEL_SETTINGS.items():
        setattr(model, name, value)
    # Training only: the fused weight-gradient accumulation writes into the DDP wrapper's main_grad buffers.
    model.gradient_accumulation_fusion = True
    # Long sequences: recompute attention's and the experts' activation inputs instead of keeping them.
    model.recompute_granularity = "selective"
    model.recompute_modules = ["core_attn", "moe_act"]
