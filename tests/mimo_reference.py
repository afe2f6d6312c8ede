"""Plain-torch MiMo-V2-Flash building blocks written from the model description (independent of both
Megatron and transformers), used as the oracle for parts transformers does not model (MTP layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """NeoX rotation of the first ``rotary_dim`` dims of ``x [s, heads, d]`` at positions 0..s-1."""
    seq = x.shape[0]
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def attention(x, w, prefix, cfg, sliding: bool) -> torch.Tensor:
    """One attention block for a single sequence ``x [s, hidden]`` (hub weight names under ``prefix``)."""
    seq = x.shape[0]
    heads, dk, dv = cfg["num_attention_heads"], cfg["head_dim"], cfg["v_head_dim"]
    kv = cfg["swa_num_key_value_heads"] if sliding else cfg["num_key_value_heads"]
    q = (x @ w[prefix + "q_proj.weight"].T).view(seq, heads, dk)
    k = (x @ w[prefix + "k_proj.weight"].T).view(seq, kv, dk)
    v = (x @ w[prefix + "v_proj.weight"].T).view(seq, kv, dv) * (cfg.get("attention_value_scale") or 1.0)
    rotary_dim = int(dk * cfg["partial_rotary_factor"])
    theta = cfg["swa_rope_theta"] if sliding else cfg["rope_theta"]
    q, k = rope(q, theta, rotary_dim), rope(k, theta, rotary_dim)
    k = k.repeat_interleave(heads // kv, dim=1)
    v = v.repeat_interleave(heads // kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * dk**-0.5
    pos = torch.arange(seq)
    allowed = pos[None, :] <= pos[:, None]
    if sliding:
        allowed &= pos[None, :] >= pos[:, None] - cfg["sliding_window_size"]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink_name = prefix + "attention_sink_bias"
    if sink_name in w:
        sink = w[sink_name].view(heads, 1, 1).expand(heads, seq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, heads * dv)
    return out @ w[prefix + "o_proj.weight"].T


def swiglu(x, w, prefix) -> torch.Tensor:
    gate = x @ w[prefix + "gate_proj.weight"].T
    up = x @ w[prefix + "up_proj.weight"].T
    return (F.silu(gate) * up) @ w[prefix + "down_proj.weight"].T


def mtp_logits(
    ids: torch.Tensor, main_hidden: torch.Tensor, w: dict, cfg: dict, num_layers: int
) -> list[torch.Tensor]:
    """MTP logits per layer for one sequence. ``main_hidden`` is the main model's final-normed hidden state.

    Layer k sees token t+k+1 (ids shifted left, the vacated tail filled with id 0) and the previous stage's
    hidden state at t: ``h = eh_proj([enorm(embed(tok)), hnorm(h_prev)])`` -> SWA attention block (sink,
    SWA rope base) -> dense SwiGLU block -> ``final_layernorm`` -> shared ``lm_head``.
    """
    eps = cfg["layernorm_epsilon"]
    hidden, tokens, outputs = main_hidden, ids, []
    for k in range(num_layers):
        p = f"model.mtp.layers.{k}."
        tokens = torch.cat([tokens[1:], torch.zeros(1, dtype=tokens.dtype)])
        emb = w["model.embed_tokens.weight"][tokens]
        h = torch.cat([rms_norm(emb, w[p + "enorm.weight"], eps), rms_norm(hidden, w[p + "hnorm.weight"], eps)], -1)
        h = h @ w[p + "eh_proj.weight"].T
        h = h + attention(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", cfg, sliding=True)
        h = h + swiglu(rms_norm(h, w[p + "pre_mlp_layernorm.weight"], eps), w, p + "mlp.")
        hidden = rms_norm(h, w[p + "final_layernorm.weight"], eps)
        outputs.append(hidden @ w["lm_head.weight"].T)
    return outputs
