#!/usr/bin/env python3
"""Compile a prepared MiMo-V2-Flash checkpoint with NxDI's MiMo adapter, load it and run a short smoke generation.

Standalone on purpose: it runs inside the Neuron SDK's virtual environment (which has torch-neuronx, NxDI and
transformers, not this project), started by ``neuron_export compile`` or copied into the ready-to-run bundle.

Every NxDI name used here was read in the NxDI sources, not guessed:
``neuronx_distributed_inference.models.config.MoENeuronConfig`` and its keyword arguments (contrib
``perf_test/smoke_compile_mimo_v2_flash.py`` and README of the MiMo-V2-Flash contrib, PRs #119/#137),
``neuronx_distributed_inference.utils.hf_adapter.load_pretrained_config(hf_config=...)`` and
``HuggingFaceGenerationAdapter(model).generate(input_ids=, attention_mask=, generation_config=)``,
``modeling_mimo_v2.MiMoV2InferenceConfig(neuron_config, load_config=...)``,
``modeling_mimo_v2.NeuronMiMoV2ForCausalLM(model_path, config)`` with ``.compile(path)`` / ``.load(path)`` and the
static ``_apply_router_noaux_tc_fix()`` (adapter commit c303b52).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_PROMPT = "Hello! Please introduce yourself in one sentence."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="prepared checkpoint (output of neuron_export prepare)")
    parser.add_argument(
        "--compiled-path", required=True, help="where NxDI writes model.pt, neuron_config.json, weights/"
    )
    parser.add_argument("--layout", required=True, help="layout JSON written by neuron_export compile")
    parser.add_argument(
        "--adapter-src",
        default=os.environ.get("NXDI_CONTRIB_MIMO_V2_FLASH_SRC"),
        help="directory holding NxDI's contrib modeling_mimo_v2.py",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true", help="only load an existing compile and generate")
    return parser.parse_args(argv)


def neuron_config_kwargs(layout: dict) -> dict:
    """``MoENeuronConfig`` keyword arguments for a BF16 MiMo-V2-Flash layout (the contrib recipe, minus FP8)."""
    batch, context = layout["batch_size"], layout.get("max_context_length") or layout["seq_len"]
    return dict(
        tp_degree=layout["tp"],
        ep_degree=1,  # outer EP stays 1: it multiplies the world size; MoE expert parallelism is moe_ep_degree
        moe_tp_degree=layout["moe_tp"],
        moe_ep_degree=layout["ep"],
        logical_nc_config=layout["logical_nc_config"],
        batch_size=batch,
        max_batch_size=batch,
        ctx_batch_size=1,
        tkg_batch_size=batch,
        seq_len=layout["seq_len"],
        max_context_length=context,
        context_encoding_buckets=[context],
        torch_dtype="bfloat16",
        capacity_factor=1.0,
        glu_mlp=True,
        fused_qkv=False,  # Q/K head dim 192 != V head dim 128
        router_config={"act_fn": "sigmoid", "dtype": "float32"},
        # SDK 2.29 lacks the default shard-hidden MoE kernel (contrib smoke script); take the shard-on-block path.
        blockwise_matmul_config={"use_shard_on_block_dynamic_while": True, "block_sharding_strategy": "PING_PONG"},
        save_sharded_checkpoint=True,
    )


def build_model(args: argparse.Namespace, layout: dict):
    """The adapter's model object for the prepared checkpoint (router-bias fix installed first)."""
    if args.adapter_src:
        sys.path.insert(0, os.path.abspath(args.adapter_src))
    from modeling_mimo_v2 import MiMoV2InferenceConfig, NeuronMiMoV2ForCausalLM
    from neuronx_distributed_inference.models.config import MoENeuronConfig
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config
    from transformers import PretrainedConfig

    # The adapter registers RouterTopK.e_score_correction_bias (and uses it for top-k selection) only when
    # neuron_config.quantized is set; on this BF16 path the bias would be dropped and tokens routed to the wrong
    # experts. Install the adapter's own fix before the model (and its routers) is built.
    fix = getattr(NeuronMiMoV2ForCausalLM, "_apply_router_noaux_tc_fix", None)
    if fix is None:
        raise SystemExit(
            "error: this MiMo adapter has no _apply_router_noaux_tc_fix; its BF16 path would drop the "
            "router correction bias (use the contrib version from NxDI PR #137, commit c303b52 or later)"
        )
    fix()
    neuron_config = MoENeuronConfig(**neuron_config_kwargs(layout))
    # config.json already carries every field the adapter reads; a plain PretrainedConfig keeps them all without
    # running the checkpoint's remote code (AutoConfig would need trust_remote_code, and transformers' native
    # MiMo config class silently replaces the hub fields with its defaults).
    hf_config = PretrainedConfig.from_json_file(os.path.join(args.model_path, "config.json"))
    config = MiMoV2InferenceConfig(neuron_config, load_config=load_pretrained_config(hf_config=hf_config))
    return NeuronMiMoV2ForCausalLM(args.model_path, config)


def smoke_generate(model, args: argparse.Namespace, batch: int) -> dict:
    from neuronx_distributed_inference.utils.hf_adapter import HuggingFaceGenerationAdapter
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer([args.prompt] * batch, return_tensors="pt", padding=True)
    generation_config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    start = time.time()
    output = HuggingFaceGenerationAdapter(model).generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=generation_config
    )
    seconds = time.time() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return {
        "prompt": args.prompt,
        "new_token_ids": new_tokens.tolist(),
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "seconds": seconds,
        "tokens_per_second": batch * new_tokens.numel() / max(seconds, 1e-9),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.layout) as handle:
        layout = json.load(handle)
    # NxDI stages HLO/NEFF files in BASE_COMPILE_WORK_DIR (default /tmp/nxd_model/); keep one per compiled path so
    # concurrent compiles do not overwrite each other (contrib smoke script).
    os.environ.setdefault(
        "BASE_COMPILE_WORK_DIR", os.path.join("/tmp/nxd_model", os.path.basename(os.path.abspath(args.compiled_path)))
    )
    model = build_model(args, layout)
    if not args.skip_compile:
        start = time.time()
        model.compile(args.compiled_path)
        print(f"[neuron_export] compiled in {time.time() - start:.0f} s -> {args.compiled_path}", flush=True)
    model.load(args.compiled_path)
    result = smoke_generate(model, args, layout["batch_size"])
    with open(os.path.join(args.compiled_path, "smoke_generation.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(
        f"[neuron_export] smoke generation: {result['text']!r} ({result['tokens_per_second']:.1f} tok/s)", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
