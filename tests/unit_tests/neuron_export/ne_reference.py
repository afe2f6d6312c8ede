"""Plain-torch MiMo-V2-Flash forward for one sequence, from a dict of weights in hub naming (fp32 compute).

Written from the model description with the attention / RMSNorm / SwiGLU helpers of ``tests/mimo_reference.py``;
independent of Megatron, transformers and ``neuron_export``. Every weight the config implies is looked up by
name (a dropped sink or router bias raises ``KeyError`` instead of silently changing the model). The router bias
name is a parameter so the same forward runs on hub and NxDI-prepared names.
"""

from __future__ import annotations

import torch
from mimo_reference import attention, rms_norm, swiglu

HUB_ROUTER_BIAS = "model.layers.{i}.mlp.gate.e_score_correction_bias"


def moe(x: torch.Tensor, w: dict, prefix: str, cfg: dict, bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid router in fp32, bias for selection only, normalized unbiased weights of the chosen experts."""
    scores = torch.sigmoid(x.float() @ w[prefix + "gate.weight"].float().T)
    _, chosen = torch.topk(scores + bias.float(), cfg["num_experts_per_tok"], dim=-1)
    weights = scores.gather(-1, chosen)
    if cfg.get("norm_topk_prob", True):
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * (cfg.get("routed_scaling_factor") or 1.0)
    out = torch.zeros_like(x)
    for expert in range(cfg["n_routed_experts"]):
        rows, slot = (chosen == expert).nonzero(as_tuple=True)
        if rows.numel():
            out[rows] += weights[rows, slot, None] * swiglu(x[rows], w, f"{prefix}experts.{expert}.")
    return out


def logits(weights: dict, cfg: dict, ids: torch.Tensor, router_bias: str = HUB_ROUTER_BIAS) -> torch.Tensor:
    """``[seq, vocab]`` fp32 logits of token ids ``[seq]``."""
    w = {k: v.float() for k, v in weights.items()}
    eps = cfg["layernorm_epsilon"]
    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = cfg["hybrid_layer_pattern"][i] == 1
        if cfg["add_swa_attention_sink_bias" if sliding else "add_full_attention_sink_bias"]:
            w[p + "self_attn.attention_sink_bias"]  # noqa: B018 (must exist: KeyError otherwise)
        h = h + attention(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", cfg, sliding)
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        if cfg["moe_layer_freq"][i]:
            h = h + moe(x, w, p + "mlp.", cfg, w[router_bias.format(i=i)])
        else:
            h = h + swiglu(x, w, p + "mlp.")
    return rms_norm(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def greedy(weights: dict, cfg: dict, ids: list[int], new_tokens: int, router_bias: str = HUB_ROUTER_BIAS) -> list[int]:
    """Greedy continuation (full recompute per token; tiny models only)."""
    tokens = list(ids)
    for _ in range(new_tokens):
        tokens.append(int(logits(weights, cfg, torch.tensor(tokens), router_bias)[-1].argmax()))
    return tokens[len(ids) :]
