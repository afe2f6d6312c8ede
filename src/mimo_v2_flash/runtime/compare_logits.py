"""Check an exported HF checkpoint: transformers' native model loads it cleanly and agrees with Megatron.

    python compare_logits.py --hf-model EXPORT_DIR --megatron-path MEGATRON_DIR --prompt "Hello" [--tolerance 1e-4]

Fails (exit 1) if transformers reports missing or unexpected weights, or if the fp32 logits of the two models
(same weights) differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime
from mimo_v2_flash.runtime.framework_logs import quiet_framework_logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-model", type=Path, required=True, help="exported HF checkpoint directory")
    parser.add_argument("--megatron-path", type=Path, required=True, help="Megatron checkpoint it came from")
    parser.add_argument("--prompt", default="The quick brown fox", help="prompt text")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed")
    args = parser.parse_args(argv)
    with quiet_framework_logs(), cpu_runtime():
        return compare(args)


def compare(args: argparse.Namespace) -> int:
    """Load both models and compare their logits; 0 when they agree within the tolerance."""
    import torch
    from transformers import AutoTokenizer, MiMoV2FlashForCausalLM
    from transformers.utils import logging as hf_logging

    from mimo_v2_flash.conversion.megatron_checkpoint import load_megatron_checkpoint
    from mimo_v2_flash.runtime.inference import forward_logits
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)
    hf_model, info = MiMoV2FlashForCausalLM.from_pretrained(
        str(args.hf_model), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    weight_warnings = [
        r for r in records if "missing" in r.lower() or "unexpected" in r.lower() or "not used" in r.lower()
    ]
    if problems or weight_warnings:
        print(f"FAIL: transformers reported weight problems: {problems or weight_warnings}")
        return 1
    ids = AutoTokenizer.from_pretrained(str(args.hf_model)).encode(args.prompt, add_special_tokens=False)
    with torch.no_grad():
        hf_logits = hf_model.eval()(torch.tensor([ids])).logits[0].float()
    initialize_parallel_state()
    megatron_logits = forward_logits(load_megatron_checkpoint(args.megatron_path, torch.float32), ids).cpu()
    diff = (hf_logits - megatron_logits).abs().max().item()
    verdict = "OK" if diff <= args.tolerance else "FAIL"
    print(
        f"{verdict}: transformers loaded {args.hf_model} with no missing/unexpected weights; "
        f"max |logits(transformers) - logits(Megatron)| = {diff:.3e} over {len(ids)} tokens "
        f"(tolerance {args.tolerance})"
    )
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
