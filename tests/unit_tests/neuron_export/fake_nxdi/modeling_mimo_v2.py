"""Test fake of NxDI's contrib ``modeling_mimo_v2.py`` (MiMo-V2-Flash adapter, PRs #119/#137, commit c303b52).

Same public names and the same contract, on CPU:

* ``MiMoV2InferenceConfig`` requires the adapter's 27 attributes (its own copy of the list, so an omission in
  ``neuron_export`` fails here) and derives ``layer_attention_types`` / ``layer_uses_moe`` like the adapter;
* ``NeuronMiMoV2ForCausalLM.compile`` loads the checkpoint like NxDI's ``get_state_dict`` (index of the directory,
  leading ``model.`` stripped), applies the adapter converter's transformations (router rename, per-expert
  weights fused into ``expert_mlps``, K/V replicated when TP exceeds the KV heads) and then checks the result
  against the parameters the adapter's module tree has: a missing parameter, a key nothing would load (NxDI
  ignores those silently; here it is an error), a wrong shape (e.g. K/V replicated twice, experts pre-fused) or a
  non-BF16 weight fails. The router bias parameter exists only after ``_apply_router_noaux_tc_fix`` (or FP8);
* ``load`` + ``HuggingFaceGenerationAdapter.generate`` decode greedily with the plain-torch reference on the
  weights mapped back from the converted (NxDI-layout) state dict, with the config values the adapter reads.

``FAKE_NXDI_NO_ROUTER_FIX=1`` removes ``_apply_router_noaux_tc_fix`` (an adapter version without it).
"""

from __future__ import annotations

import json
import os

import torch
from neuronx_distributed_inference.models.config import InferenceConfig, MoENeuronConfig
from safetensors import safe_open
from safetensors.torch import save_file

REQUIRED_ATTRIBUTES = [
    "attention_bias", "head_dim", "hidden_act", "hidden_size", "hybrid_layer_pattern", "layernorm_epsilon",
    "max_position_embeddings", "moe_intermediate_size", "moe_layer_freq", "n_routed_experts", "norm_topk_prob",
    "num_attention_heads", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads", "partial_rotary_factor",
    "rope_theta", "scoring_func", "sliding_window", "swa_head_dim", "swa_num_attention_heads",
    "swa_num_key_value_heads", "swa_rope_theta", "swa_v_head_dim", "tie_word_embeddings", "v_head_dim", "vocab_size",
]  # fmt: skip


class MiMoV2InferenceConfig(InferenceConfig):
    """The adapter's config: validated attributes plus the per-layer views it derives."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_local_experts = self.n_routed_experts
        self.intermediate_size = self.moe_intermediate_size  # the adapter overwrites it (dense size is separate)
        self.neuron_config.router_config.dtype = torch.float32
        self.neuron_config.router_config.act_fn = "sigmoid"
        self.layer_attention_types = ["sliding_window" if p == 1 else "full" for p in self.hybrid_layer_pattern]
        self.layer_uses_moe = [bool(f) for f in self.moe_layer_freq]

    def get_required_attributes(self) -> list[str]:
        return list(REQUIRED_ATTRIBUTES)

    @classmethod
    def get_neuron_config_cls(cls):
        return MoENeuronConfig


def _attention_dims(config, layer: int) -> tuple[int, int, int]:
    if config.layer_attention_types[layer] == "sliding_window":
        return config.swa_num_key_value_heads, config.swa_head_dim, config.swa_v_head_dim
    return config.num_key_value_heads, config.head_dim, config.v_head_dim


def convert_state_dict(sd: dict, config) -> dict:
    """The adapter converter's transformations (BF16 path)."""
    assert config.neuron_config.glu_mlp is True, "Only GLU MLP is supported"
    scales = [k for k in sd if k.endswith("_scale_inv")]
    if scales:
        raise ValueError(f"FP8 scale {scales[0]} in a BF16 checkpoint (the adapter's plain-grid dequant is not exact)")
    tp, heads = config.neuron_config.tp_degree, config.num_attention_heads
    for i in range(config.num_hidden_layers):
        kv, head_dim, v_dim = _attention_dims(config, i)
        if tp > kv:
            for proj, dim in (("k_proj", head_dim), ("v_proj", v_dim)):
                key = f"layers.{i}.self_attn.{proj}.weight"
                if key in sd:
                    tensor = sd[key]
                    sd[key] = tensor.view(kv, dim, -1).repeat_interleave(heads // kv, dim=0).view(-1, tensor.shape[-1])
        gate = f"layers.{i}.mlp.gate.weight"
        if not config.layer_uses_moe[i] or gate not in sd:
            continue
        sd[f"layers.{i}.mlp.router.linear_router.weight"] = sd.pop(gate)
        if f"layers.{i}.mlp.experts.0.gate_proj.weight" not in sd:
            continue
        experts = range(config.n_routed_experts)
        gates = [sd.pop(f"layers.{i}.mlp.experts.{e}.gate_proj.weight").T for e in experts]
        ups = [sd.pop(f"layers.{i}.mlp.experts.{e}.up_proj.weight").T for e in experts]
        downs = [sd.pop(f"layers.{i}.mlp.experts.{e}.down_proj.weight").T for e in experts]
        sd[f"layers.{i}.mlp.expert_mlps.mlp_op.gate_up_proj.weight"] = torch.stack(
            [torch.cat([g, u], dim=-1) for g, u in zip(gates, ups, strict=True)]
        )
        sd[f"layers.{i}.mlp.expert_mlps.mlp_op.down_proj.weight"] = torch.stack(downs)
    return sd


def module_parameters(config, routers_have_bias: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter the adapter's module tree has (after conversion)."""
    h, heads, tp = config.hidden_size, config.num_attention_heads, config.neuron_config.tp_degree
    params = {
        "embed_tokens.weight": (config.vocab_size, h),
        "norm.weight": (h,),
        "lm_head.weight": (config.vocab_size, h),
    }
    for i in range(config.num_hidden_layers):
        kv, head_dim, v_dim = _attention_dims(config, i)
        kv = heads if tp > kv else kv
        p = f"layers.{i}."
        params.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        attention = {"q_proj": (heads * head_dim, h), "k_proj": (kv * head_dim, h), "v_proj": (kv * v_dim, h),
                     "o_proj": (h, heads * v_dim)}  # fmt: skip
        params.update({f"{p}self_attn.{name}.weight": shape for name, shape in attention.items()})
        sliding = config.layer_attention_types[i] == "sliding_window"
        if getattr(config, "add_swa_attention_sink_bias" if sliding else "add_full_attention_sink_bias", sliding):
            params[p + "self_attn.attention_sink_bias"] = (heads,)
        if config.layer_uses_moe[i]:
            experts, inter = config.n_routed_experts, config.moe_intermediate_size
            params[p + "mlp.router.linear_router.weight"] = (experts, h)
            if routers_have_bias:
                params[p + "mlp.router.e_score_correction_bias"] = (experts,)
            params[p + "mlp.expert_mlps.mlp_op.gate_up_proj.weight"] = (experts, h, 2 * inter)
            params[p + "mlp.expert_mlps.mlp_op.down_proj.weight"] = (experts, inter, h)
        else:
            dense = getattr(config, "dense_intermediate_size", config.intermediate_size * 8)
            params.update({p + "mlp.gate_proj.weight": (dense, h), p + "mlp.up_proj.weight": (dense, h),
                           p + "mlp.down_proj.weight": (h, dense)})  # fmt: skip
    return params


class NeuronMiMoV2ForCausalLM:
    """CPU stand-in for the adapter's causal LM (compile = check + convert + write; load; greedy decode)."""

    _router_bias_patched = False

    def __init__(self, model_path: str, config: MiMoV2InferenceConfig) -> None:
        self.model_path, self.config, self.neuron_config = model_path, config, config.neuron_config
        # Like the real patch: routers get the bias parameter only if RouterTopK was patched before construction.
        self.routers_have_bias = NeuronMiMoV2ForCausalLM._router_bias_patched or self.neuron_config.quantized
        self.is_loaded = False
        self.converted = None

    @staticmethod
    def _apply_router_noaux_tc_fix() -> None:
        NeuronMiMoV2ForCausalLM._router_bias_patched = True

    def get_state_dict(self) -> dict:
        index = json.load(open(os.path.join(self.model_path, "model.safetensors.index.json")))["weight_map"]
        sd = {}
        for shard in sorted(set(index.values())):
            with safe_open(os.path.join(self.model_path, shard), framework="pt") as handle:
                sd.update({k.removeprefix("model."): handle.get_tensor(k) for k in handle.keys()})
        return sd

    def checked_state_dict(self) -> dict:
        sd = self.get_state_dict()
        for name, tensor in sd.items():
            wanted = torch.float32 if name.endswith("router.e_score_correction_bias") else torch.bfloat16
            if tensor.dtype != wanted:
                raise TypeError(f"{name}: dtype {tensor.dtype}, the BF16 path expects {wanted}")
        converted = convert_state_dict(sd, self.config)
        expected = module_parameters(self.config, self.routers_have_bias)
        missing = sorted(set(expected) - set(converted))
        ignored = sorted(set(converted) - set(expected))
        if missing or ignored:
            raise KeyError(
                f"missing parameters {missing[:3]}, keys no parameter loads (silently dropped) {ignored[:3]}"
            )
        for name, shape in expected.items():
            if tuple(converted[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(converted[name].shape)}, the module expects {shape}")
        return converted

    def compile(self, compiled_model_path: str, debug: bool = False, dry_run: bool = False) -> None:
        self.converted = self.checked_state_dict()
        os.makedirs(os.path.join(compiled_model_path, "weights"), exist_ok=True)
        settings = {k: v for k, v in vars(self.neuron_config).items() if isinstance(v, (int, float, str, bool, list))}
        json.dump(settings, open(os.path.join(compiled_model_path, "neuron_config.json"), "w"), indent=2)
        open(os.path.join(compiled_model_path, "model.pt"), "wb").write(b"fake traced model\n")
        tp = self.neuron_config.tp_degree
        for rank in range(tp if self.neuron_config.save_sharded_checkpoint else 0):
            shard = {}
            for name, tensor in self.converted.items():
                if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                    if tensor.shape[0] % tp:
                        raise ValueError(f"{name}: {tensor.shape[0]} rows do not split over TP {tp}")
                    tensor = tensor.chunk(tp)[rank]
                shard[name] = tensor.contiguous()
            save_file(shard, os.path.join(compiled_model_path, "weights", f"tp{rank}_sharded_checkpoint.safetensors"))

    def load(self, compiled_model_path: str, skip_warmup: bool = False) -> None:
        saved = json.load(open(os.path.join(compiled_model_path, "neuron_config.json")))
        if saved["tp_degree"] != self.neuron_config.tp_degree:
            raise ValueError("compiled with a different tp_degree")
        if self.converted is None:
            self.converted = self.checked_state_dict()
        self.weights, self.reference_config = self._reference_view()
        self.is_loaded = True

    def _reference_view(self) -> tuple[dict, dict]:
        """Hub-named weights recovered from the NxDI layout, and the config values the adapter uses."""
        c, sd = self.config, dict(self.converted)
        for i in range(c.num_hidden_layers):
            kv, head_dim, v_dim = _attention_dims(c, i)
            if c.neuron_config.tp_degree > kv:
                step = c.num_attention_heads // kv
                for proj, dim in (("k_proj", head_dim), ("v_proj", v_dim)):
                    key = f"layers.{i}.self_attn.{proj}.weight"
                    sd[key] = sd[key].view(c.num_attention_heads, dim, -1)[::step].reshape(kv * dim, -1)
            if c.layer_uses_moe[i]:
                p = f"layers.{i}.mlp."
                sd[p + "gate.weight"] = sd.pop(p + "router.linear_router.weight")
                bias = sd.pop(p + "router.e_score_correction_bias", torch.zeros(c.n_routed_experts))
                sd[p + "gate.e_score_correction_bias"] = bias
                gate_up, down = (
                    sd.pop(p + "expert_mlps.mlp_op.gate_up_proj.weight"),
                    sd.pop(p + "expert_mlps.mlp_op.down_proj.weight"),
                )
                for e in range(c.n_routed_experts):
                    sd[f"{p}experts.{e}.gate_proj.weight"], sd[f"{p}experts.{e}.up_proj.weight"] = gate_up[e].T.chunk(
                        2
                    )
                    sd[f"{p}experts.{e}.down_proj.weight"] = down[e].T
        weights = {(k if k == "lm_head.weight" else "model." + k): v for k, v in sd.items()}
        reference_config = {
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "head_dim": c.head_dim, "v_head_dim": c.v_head_dim, "num_key_value_heads": c.num_key_value_heads,
            "swa_num_key_value_heads": c.swa_num_key_value_heads, "partial_rotary_factor": c.partial_rotary_factor,
            "rope_theta": c.rope_theta, "swa_rope_theta": c.swa_rope_theta, "layernorm_epsilon": c.layernorm_epsilon,
            "attention_value_scale": float(getattr(c, "attention_value_scale", 1.0)),
            "sliding_window_size": c.sliding_window - 1,  # the adapter's window counts the query itself
            "hybrid_layer_pattern": c.hybrid_layer_pattern, "moe_layer_freq": c.moe_layer_freq,
            "add_full_attention_sink_bias": getattr(c, "add_full_attention_sink_bias", False),
            "add_swa_attention_sink_bias": getattr(c, "add_swa_attention_sink_bias", True),
            "n_routed_experts": c.n_routed_experts, "num_experts_per_tok": c.num_experts_per_tok,
            "norm_topk_prob": True,
        }  # fmt: skip
        return weights, reference_config

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        from ne_reference import greedy

        return greedy(self.weights, self.reference_config, prompt, steps)


if os.environ.get("FAKE_NXDI_NO_ROUTER_FIX") == "1":
    del NeuronMiMoV2ForCausalLM._apply_router_noaux_tc_fix
