"""The built-in tiny MiMo-V2-Flash: a random Hugging Face checkpoint with every feature of the real model.

Written by transformers' native ``MiMoV2FlashForCausalLM`` (``save_pretrained`` produces hub tensor names),
plus MTP layers under ``model.mtp.layers.N`` (which transformers does not model), a config carrying both the
hub and the native spellings, and a small byte-level BPE tokenizer trained here. Used by the demo and the tests;
nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mimo_v2_flash.checkpoint.fp8_export import (
    is_fp8_quantized_in_release,
    release_kv_layout,
    release_quantization_config,
)
from mimo_v2_flash.config import released_config, with_native_fields

__all__ = ["is_fp8_quantized_in_release", "tiny_config", "write_fp8_checkpoint", "write_tiny_checkpoint"]

TINY_CORPUS = (
    "MiMo-V2-Flash is a mixture of experts language model with hybrid sliding window attention. "
    "Megatron-Bridge converts checkpoints between Hugging Face and Megatron-Core. "
    "The quick brown fox jumps over the lazy dog. 0123456789 "
    "User: hello! Assistant: hi, how can I help you today? "
)

# Chat markup of the MiMo release (<|im_start|>role ... <|im_end|>); the generation block marks the assistant
# tokens that supervised fine-tuning trains on.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """Hub-form config of a small MiMo-V2-Flash: the released architecture with tiny sizes.

    Native fields are added when the checkpoint is written; ``overrides`` replace any field.
    """
    cfg = released_config()
    cfg.update(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        swa_num_key_value_heads=2,
        head_dim=24,
        v_head_dim=16,
        hybrid_layer_pattern=[0, 1, 1, 0],
        moe_layer_freq=[0, 1, 1, 1],
        sliding_window_size=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    # The SWA attention fields follow the (possibly overridden) full-attention ones unless given themselves.
    for swa, full in (
        ("swa_num_attention_heads", "num_attention_heads"),
        ("swa_head_dim", "head_dim"),
        ("swa_v_head_dim", "v_head_dim"),
    ):
        if swa not in overrides:
            cfg[swa] = cfg[full]
    return cfg


def native_model(cfg: dict[str, Any], seed: int = 0):
    """transformers' ``MiMoV2FlashForCausalLM`` for a hub/native config dict, with every buffer randomized."""
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    native = with_native_fields(cfg)
    if native["swa_num_key_value_heads"] != 2 * native["num_key_value_heads"]:
        raise ValueError("transformers' native model hard-codes SWA KV heads = 2 x full KV heads")
    allowed = set(MiMoV2FlashConfig.__dataclass_fields__) | {"architectures", "torch_dtype", "dtype"}
    torch.manual_seed(seed)
    config = MiMoV2FlashConfig(**{k: v for k, v in native.items() if k in allowed and v is not None})
    config._attn_implementation = "eager"
    model = MiMoV2FlashForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand_like(buffer) * 0.2)
    return model


def mtp_tensors(cfg: dict[str, Any], num_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random MTP layers in hub naming (dense SwiGLU, SWA attention with sink)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["swa_num_key_value_heads"]
    dk, dv, ffn = cfg["head_dim"], cfg["v_head_dim"], cfg["intermediate_size"]
    std = cfg["initializer_range"]

    def rand(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    tensors = {}
    for i in range(num_layers):
        p = f"model.mtp.layers.{i}."
        tensors.update(
            {
                p + "enorm.weight": rand(hidden, mean=1.0),
                p + "hnorm.weight": rand(hidden, mean=1.0),
                p + "eh_proj.weight": rand(hidden, 2 * hidden),
                p + "input_layernorm.weight": rand(hidden, mean=1.0),
                p + "self_attn.q_proj.weight": rand(heads * dk, hidden),
                p + "self_attn.k_proj.weight": rand(kv * dk, hidden),
                p + "self_attn.v_proj.weight": rand(kv * dv, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * dv),
                p + "self_attn.attention_sink_bias": rand(heads),
                p + "pre_mlp_layernorm.weight": rand(hidden, mean=1.0),
                p + "mlp.gate_proj.weight": rand(ffn, hidden),
                p + "mlp.up_proj.weight": rand(ffn, hidden),
                p + "mlp.down_proj.weight": rand(hidden, ffn),
                p + "final_layernorm.weight": rand(hidden, mean=1.0),
            }
        )
    return tensors


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer on the built-in corpus and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TINY_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def write_tiny_checkpoint(
    directory: str | Path,
    cfg: dict[str, Any] | None = None,
    mtp_layers: int = 1,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Write a random MiMo-V2-Flash HF checkpoint (fp32 safetensors, sharded, with MTP) into ``directory``."""
    directory = Path(directory)
    cfg = cfg or tiny_config()
    model = native_model(cfg, seed)
    model.save_pretrained(str(directory), safe_serialization=True, max_shard_size="200KB")
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), "pt") as handle:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in handle.keys()}}
    if mtp_layers:
        extra = mtp_tensors(cfg, mtp_layers, seed)
        save_file(extra, str(directory / "model-mtp.safetensors"), metadata={"format": "pt"})
        index["weight_map"].update({name: "model-mtp.safetensors" for name in extra})
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        total += (directory / shard).stat().st_size
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    (directory / "config.json").write_text(json.dumps(with_native_fields(cfg), indent=2))
    if tokenizer:
        write_tokenizer(directory, cfg["vocab_size"])
    return directory


def write_fp8_checkpoint(
    src: str | Path, dst: str | Path, block: tuple[int, int] = (16, 16), kv_layout: str = "release"
) -> Path:
    """Re-save an HF checkpoint the way MiMo-V2-Flash was released: block FP8 projections, BF16 for the rest,
    ``e_score_correction_bias`` kept fp32, ``quantization_config`` in config.json.

    K and V of every layer are quantized in ``kv_layout``; the default ``release`` is the release's rule
    (:func:`release_kv_layout`: ``fused_kv_split`` on full layers with one KV head per rank, the plain grid on SWA
    and MTP layers with two). Other projections are on the grid.
    """
    from mimo_v2_flash.checkpoint.fp8_quantization import quantize_blockwise, quantize_kv
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
    from mimo_v2_flash.config import parse_architecture

    src, dst = Path(src), Path(dst)
    ckpt = HFCheckpoint(src)
    arch = parse_architecture(ckpt.config)
    dst.mkdir(parents=True, exist_ok=False)
    weight_map: dict[str, str] = {}
    shards = sorted(set(ckpt.weight_map.values()))
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        for name in sorted(n for n, s in ckpt.weight_map.items() if s == shard):
            tensor = ckpt.get(name)
            if name.endswith("self_attn.v_proj.weight"):
                continue  # written together with its k_proj
            if name.endswith("self_attn.k_proj.weight"):
                v_name = name.replace("k_proj", "v_proj")
                kv_heads = tensor.shape[0] // arch.head_dim
                layout = release_kv_layout(ckpt.config, kv_heads) if kv_layout == "release" else kv_layout
                qk, sk, qv, sv = quantize_kv(tensor, ckpt.get(v_name), kv_heads, block, layout)
                out.update({name: qk, name + "_scale_inv": sk, v_name: qv, v_name + "_scale_inv": sv})
            elif is_fp8_quantized_in_release(name):
                q, s = quantize_blockwise(tensor, block)
                out.update({name: q, name + "_scale_inv": s})
            elif name.endswith("e_score_correction_bias"):
                out[name] = tensor.float()
            else:
                out[name] = tensor.to(torch.bfloat16)
        save_file({k: v.contiguous() for k, v in out.items()}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in out})
    total = sum((dst / shard).stat().st_size for shard in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(ckpt.config, torch_dtype="bfloat16")
    config["quantization_config"] = release_quantization_config(weight_map, block)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if (
            extra.is_file()
            and not extra.name.endswith((".safetensors", ".json"))
            or extra.name.startswith("tokenizer")
        ):
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst
