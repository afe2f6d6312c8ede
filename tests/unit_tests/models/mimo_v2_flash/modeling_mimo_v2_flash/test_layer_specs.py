"""One checkpoint layout for both backends: the local model's checkpoint keys are the ones Megatron-Core's
TransformerEngine layer specs produce (derived from those specs and their key maps, without TransformerEngine),
and ``_extra_state`` entries are neither written nor required."""

from __future__ import annotations

import copy

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer
from mimo_testing import megatron_model
from torch.distributed.checkpoint.api import CheckpointException


class _LayerNormColumnParallelLinear:  # stand-ins for the TE classes the TE spec places
    params = ("weight", "layer_norm_weight")


class _ColumnParallelLinear:
    params = ("weight",)


class _RowParallelLinear:
    params = ("weight",)


class _Norm:
    params = ("weight",)


class _TESpecChoices(LocalSpecProvider):
    """The choices of Megatron-Core's ``TESpecProvider`` (norms fused into the following linear), with stand-ins
    for TransformerEngine's classes, which cannot be imported here."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self):
        return _LayerNormColumnParallelLinear

    def column_parallel_linear(self):
        return _ColumnParallelLinear

    def row_parallel_linear(self):
        return _RowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return _Norm


def _module(spec):
    return getattr(spec, "module", getattr(spec, "func", spec))


def _params(prefix: str, spec) -> set[str]:
    return {prefix + name for name in getattr(_module(spec), "params", ())}


def te_layer_keys(layer_spec, sink: bool) -> set[str]:
    """Checkpoint keys of one TE-spec transformer layer: its modules' parameters, renamed by its key map."""
    sub = layer_spec.submodules
    attention = sub.self_attention.submodules
    keys = _params("input_layernorm.", sub.input_layernorm) | _params("pre_mlp_layernorm.", sub.pre_mlp_layernorm)
    keys |= _params("self_attention.linear_qkv.", attention.linear_qkv)
    keys |= _params("self_attention.linear_proj.", attention.linear_proj)
    if sink:
        keys.add("self_attention.core_attention.softmax_offset")
    if _module(sub.mlp) is MoELayer:
        # TopKRouter; TEGroupedMLP's and SequentialMLP's sharded keys are interchangeable (experts sharded in one key)
        keys |= {"mlp.router.weight", "mlp.router.expert_bias"}
        keys |= {"mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight"}
    else:
        mlp = sub.mlp.keywords["submodules"]
        keys |= _params("mlp.linear_fc1.", mlp.linear_fc1) | _params("mlp.linear_fc2.", mlp.linear_fc2)
    renamed = set()
    for key in keys:
        for old, new in (sub.sharded_state_dict_keys_map or {}).items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed.add(key)
    return renamed


def te_checkpoint_keys(provider, monkeypatch) -> set[str]:
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", _TESpecChoices)
    config = copy.copy(provider)
    config.use_transformer_engine, config.moe_grouped_gemm = True, True
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm")
    keys = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
    for index, layer_spec in enumerate(block.layer_specs):
        sink = provider.attention_layer_types[index] == "sliding_attention" and provider.swa_attention_sink
        keys |= {f"decoder.layers.{index}.{key}" for key in te_layer_keys(layer_spec, sink)}
    mtp_layer = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=None, moe_grouped_gemm=False)
    for index in range(provider.mtp_num_layers or 0):
        prefix = f"mtp.layers.{index}."
        keys |= {prefix + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")}
        layer_keys = te_layer_keys(mtp_layer, sink=provider.swa_attention_sink)
        keys |= {f"{prefix}transformer_layer.{key}" for key in layer_keys}
    return keys


def checkpoint_entries(model) -> dict[str, list]:
    entries: dict[str, list] = {}
    for value in model.sharded_state_dict().values():
        entries.setdefault(value.key, []).append(value)
    return entries


def test_local_checkpoint_keys_are_the_te_spec_keys(tiny_hf_dir, parallel_state, monkeypatch):
    model = megatron_model(tiny_hf_dir)
    entries = checkpoint_entries(model)
    assert all(isinstance(v, ShardedTensor | ShardedTensorFactory) for vs in entries.values() for v in vs)
    expected = te_checkpoint_keys(model.config, monkeypatch)
    assert any(key.endswith("pre_mlp_layernorm.weight") for key in expected)  # MoE layers keep their own norm
    assert set(entries) == expected


def test_checkpoints_with_or_without_extra_state_load_and_a_missing_weight_fails(
    tiny_hf_dir, parallel_state, tmp_path
):
    source, target = megatron_model(tiny_hf_dir), megatron_model(tiny_hf_dir)
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.zero_()
    # Upstream's (and TransformerEngine's) layout: _extra_state entries included.
    upstream = GPTModel.sharded_state_dict(source)
    assert any(isinstance(v, ShardedObject) and v.key.endswith("_extra_state") for v in upstream.values())
    (tmp_path / "with_extra_state").mkdir()
    (tmp_path / "missing").mkdir()
    dist_checkpointing.save(upstream, str(tmp_path / "with_extra_state"))
    loaded = dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path / "with_extra_state"))
    result = target.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    ids = torch.tensor([[3, 7, 11, 2, 5]])
    positions = torch.arange(5).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(source(ids, positions, None), target(ids, positions, None))
    # Ours: no _extra_state; a weight left out of the checkpoint is an error on load, not an initial value.
    ours = source.sharded_state_dict()
    assert not any(key.endswith("_extra_state") for key in ours)
    dropped = next(key for key in ours if key.endswith("linear_fc2.weight"))
    dist_checkpointing.save({k: v for k, v in ours.items() if k != dropped}, str(tmp_path / "missing"))
    with pytest.raises(CheckpointException) as error:  # holds each rank's failure
        dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path / "missing"))
    assert f"{dropped} from model not in state dict" in repr(error.value.failures)


def test_sinks_are_initialized_and_marked_split_over_tensor_parallel_ranks(tiny_hf_dir, parallel_state):
    """Clipping's gradient norm counts an unmarked parameter on TP rank 0 only; the sinks are split by head."""
    from megatron.bridge import AutoBridge
    from mimo_v2_flash.runtime.inference import build_model, configure_provider

    provider = configure_provider(
        AutoBridge.from_hf_pretrained(str(tiny_hf_dir)).to_megatron_provider(load_weights=False), torch.float32
    )
    torch.manual_seed(0)
    scratch = build_model(provider)  # from scratch: every parameter from its init method
    sinks = [(n, p) for n, p in scratch.named_parameters() if n.endswith("softmax_offset")]
    assert sinks
    for name, sink in sinks:
        assert torch.isfinite(sink).all() and sink.std() > 0, name
        assert sink.tensor_model_parallel and sink.partition_dim == 0 and sink.partition_stride == 1, name


def test_provide_keeps_upstream_checks(parallel_state, tiny_hf_dir):
    """``provide`` delegates to ``GPTModelProvider.provide``: its CUDA-graph check runs for MiMo too."""
    from megatron.bridge import AutoBridge

    provider = AutoBridge.from_hf_pretrained(str(tiny_hf_dir)).to_megatron_provider(load_weights=False)
    provider.use_transformer_engine = False
    provider.cuda_graph_impl = "local"
    with pytest.raises(ValueError, match="cuda_graph_impl"):  # upstream validate_cuda_graph_configuration
        provider.provide()
