"""The fine-tuning recipe: the GPU configuration on every host (as upstream's large-MoE recipes), full SFT and
LoRA; the launcher's host settings change it only without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_recipe import mimo_v2_flash_finetune_config
from mimo_v2_flash.conversion.cli import main as convert_main
from mimo_v2_flash.runtime import cpu_adaptations

REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def pretrained(tiny_hf_dir, parallel_state, tmp_path_factory) -> Path:
    convert = convert_main
    output = tmp_path_factory.mktemp("recipe") / "mcore"
    assert convert(["import", "--hf-model", str(tiny_hf_dir), "--megatron-path", str(output), "--dtype",
                        "float32"]) == 0  # fmt: skip
    return output


def config(pretrained: Path, tiny_hf_dir: Path, tmp_path: Path, data_format: str = "chat", **kwargs):
    return mimo_v2_flash_finetune_config(
        pretrained_checkpoint=pretrained,
        dataset_root=tmp_path / "data",
        data_format=data_format,
        tokenizer=tiny_hf_dir,
        output_dir=tmp_path / "run",
        **kwargs,
    )


def test_sft_config(pretrained, tiny_hf_dir, tmp_path):
    cfg = config(pretrained, tiny_hf_dir, tmp_path, train_iters=7, mtp_loss_scale=0.3, seq_length=64)
    model = cfg.model
    assert type(model).__name__ == "MiMoV2FlashModelProvider" and model.mtp_num_layers == 1
    assert model.mtp_loss_scaling_factor == 0.3 and model.seq_length == 64
    assert model.moe_router_dtype == "fp32" and model.moe_router_score_function == "sigmoid"
    assert model.moe_router_enable_expert_bias and model.moe_router_bias_update_rate == 0.0
    assert model.moe_aux_loss_coeff == 0.0 and model.moe_z_loss_coeff is None
    assert cfg.peft is None and cfg.optimizer.lr == 5e-6
    assert cfg.checkpoint.pretrained_checkpoint == str(pretrained)
    assert cfg.checkpoint.save == cfg.checkpoint.load == str(tmp_path / "run")
    assert cfg.checkpoint.save_interval == 7 and cfg.train.train_iters == 7
    assert type(cfg.dataset.preprocessing).__name__ == "ChatSFTPreprocessingConfig"


def test_the_recipe_is_the_gpu_configuration_on_every_host(pretrained, tiny_hf_dir, tmp_path, monkeypatch):
    cfg = config(pretrained, tiny_hf_dir, tmp_path, tp=2, ep=2)
    model = cfg.model
    assert model.use_transformer_engine is True and model.bf16 and model.params_dtype == torch.bfloat16
    assert model.moe_grouped_gemm and model.moe_token_dispatcher_type == "alltoall" and model.moe_permute_fusion
    assert model.gradient_accumulation_fusion and model.bias_activation_fusion and model.cross_entropy_loss_fusion
    assert model.expert_tensor_parallel_size == 1 and model.sequence_parallel
    assert model.recompute_granularity == "selective" and "core_attn" in model.recompute_modules
    assert cfg.ddp.use_distributed_optimizer and cfg.optimizer.use_distributed_optimizer
    assert cfg.ddp.overlap_grad_reduce and cfg.ddp.overlap_param_gather and cfg.optimizer.clip_grad == 1.0
    assert cfg.ddp.average_in_collective
    assert cfg.mixed_precision == "bf16_mixed" and cfg.dist.distributed_backend == "nccl"
    monkeypatch.setattr(cpu_adaptations, "cuda_absent", lambda: False)
    on_a_gpu_host = config(pretrained, tiny_hf_dir, tmp_path, tp=2, ep=2)
    assert repr(on_a_gpu_host.to_dict()) == repr(cfg.to_dict())  # init methods are partials: compared by repr


def test_host_settings_change_it_only_without_cuda(pretrained, tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_adaptations, "cuda_absent", lambda: True)  # a host without CUDA, whatever this one is
    cfg = config(pretrained, tiny_hf_dir, tmp_path)
    assert cpu_adaptations.apply_cpu_training_settings(cfg) is True
    assert cfg.model.use_transformer_engine is False and not cfg.model.moe_grouped_gemm
    assert cfg.model.moe_token_dispatcher_type == "allgather" and not cfg.model.gradient_accumulation_fusion
    assert cfg.dist.distributed_backend == "gloo" and cfg.mixed_precision is None
    assert cfg.model.params_dtype == torch.float32 and not cfg.model.bf16
    assert cfg.optimizer.clip_grad == 1.0 and cfg.checkpoint.load_rng is False  # clipping works on the CPU too
    assert not cfg.ddp.use_distributed_optimizer and not cfg.optimizer.use_distributed_optimizer
    assert not cfg.ddp.average_in_collective
    assert cfg.dataset.num_workers == 0 and not cfg.dataset.pin_memory
    gpu = config(pretrained, tiny_hf_dir, tmp_path)
    monkeypatch.setattr(cpu_adaptations, "cuda_absent", lambda: False)
    before = repr(gpu.to_dict())
    assert cpu_adaptations.apply_cpu_training_settings(gpu) is False and repr(gpu.to_dict()) == before


def test_local_backend_turns_te_only_features_off(pretrained, tiny_hf_dir, tmp_path):
    model = config(pretrained, tiny_hf_dir, tmp_path, backend="local").model
    assert model.use_transformer_engine is False
    assert not model.moe_grouped_gemm and not model.gradient_accumulation_fusion and not model.moe_permute_fusion


def test_lora_and_router_options(pretrained, tiny_hf_dir, tmp_path):
    cfg = config(
        pretrained, tiny_hf_dir, tmp_path, peft="lora", lora_dim=4, lora_alpha=8, router_bias_update_rate=1e-3,
        moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, data_format="prompt_completion",
    )  # fmt: skip
    assert type(cfg.peft).__name__ == "LoRA" and (cfg.peft.dim, cfg.peft.alpha) == (4, 8)
    assert sorted(cfg.peft.target_modules) == ["linear_fc1", "linear_fc2", "linear_proj", "linear_qkv"]
    assert cfg.optimizer.lr == 1e-4
    assert cfg.model.moe_router_bias_update_rate == 1e-3
    assert cfg.model.moe_aux_loss_coeff == 1e-2 and cfg.model.moe_router_load_balancing_type == "seq_aux_loss"
    assert cfg.model.moe_z_loss_coeff == 1e-3
    assert cfg.dataset.preprocessing.prompt_column == "input"
    assert cfg.dataset.preprocessing.completion_column == "output"


def test_refusals(pretrained, tiny_hf_dir, tmp_path):
    with pytest.raises(ValueError, match="peft must be"):
        config(pretrained, tiny_hf_dir, tmp_path, peft="dora")


def test_tensor_parallel_training_uses_sequence_parallelism(pretrained, tiny_hf_dir, tmp_path):
    cfg = config(pretrained, tiny_hf_dir, tmp_path, tp=2, ep=2)
    assert cfg.model.sequence_parallel and cfg.model.tensor_model_parallel_size == 2
    assert cfg.model.expert_model_parallel_size == 2 and cfg.model.expert_tensor_parallel_size == 1
    assert not config(pretrained, tiny_hf_dir, tmp_path).model.sequence_parallel
