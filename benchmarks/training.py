#!/usr/bin/env python
"""Training throughput of the tiny MiMo-V2-Flash: our Megatron path (finetune.sh) vs transformers' native model.

    .venv/bin/python benchmarks/training.py [--steps 30] [--seq-length 128] [--global-batch-size 8]

Both sides train the same tiny checkpoint in fp32 on the CPU, each in its own process with the same thread
count, on batches of exactly ``seq-length`` tokens (every record is longer and is truncated), with the same
micro/global batch sizes and Adam. Megatron's side is ``bash finetune.sh`` (Megatron-Bridge's loop, which also
trains the MTP layer, extra work transformers does not do); its step time is read from Megatron's own
"elapsed time per iteration". transformers' side is a plain loop (forward with labels, backward, AdamW step).
The first steps of each are warm-up and not counted. Prints tokens/s of each and their ratio, from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "examples/models/mimo_v2_flash/finetune.sh"
STEP_TIME = re.compile(r"iteration\s+(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def write_long_records(path: Path, count: int = 200) -> None:
    """Prompt/completion records far longer than the sequence, so every sample is truncated to full length."""
    text = "the quick brown fox jumps over the lazy dog " * 40
    path.write_text("".join(json.dumps({"input": f"Repeat {i}:", "output": text}) + "\n" for i in range(count)))


def megatron_step_times(hf_dir: Path, data: Path, work: Path, args) -> list[float]:
    command = ["bash", str(FINETUNE), "--hf-model", str(hf_dir), "--data", str(data), "--output", str(work / "run")]
    command += ["--train-iters", str(args.steps), "--seq-length", str(args.seq_length), "--lr", "1e-4"]
    command += ["--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"finetune.sh failed:\n{(done.stdout + done.stderr)[-3000:]}")
    times = {int(m.group(1)): float(m.group(2)) / 1000 for m in STEP_TIME.finditer(done.stdout + done.stderr)}
    return [times[step] for step in sorted(times) if step > args.warmup]


def transformers_step_times(hf_dir: str, steps: int, warmup: int, seq: int, gbs: int, mbs: int) -> list[float]:
    """Runs in its own process (see ``--transformers-worker``)."""
    import torch
    from transformers import MiMoV2FlashForCausalLM

    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0)
    vocab = model.config.vocab_size
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        for _ in range(gbs // mbs):
            ids = torch.randint(0, vocab, (mbs, seq))
            loss = model(input_ids=ids, labels=ids).loss * (mbs / gbs)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--transformers-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transformers_worker:
        times = transformers_step_times(
            args.transformers_worker, args.steps, args.warmup, args.seq_length, args.global_batch_size,
            args.micro_batch_size,
        )  # fmt: skip
        print(json.dumps(times))
        return

    from mimo_v2_flash.tiny_checkpoint import write_tiny_checkpoint

    threads = str(os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    with tempfile.TemporaryDirectory(prefix="mimo_train_bench_") as tmp:
        work = Path(tmp)
        hf_dir = write_tiny_checkpoint(work / "hf")
        data = work / "long.jsonl"
        write_long_records(data)
        print(f"tiny model, fp32, {os.environ['OMP_NUM_THREADS']} threads, seq {args.seq_length}, "
              f"global batch {args.global_batch_size}, micro batch {args.micro_batch_size}, "
              f"{args.steps} steps ({args.warmup} warm-up)", flush=True)  # fmt: skip
        ours = megatron_step_times(hf_dir, data, work, args)
        worker = [sys.executable, __file__, "--transformers-worker", str(hf_dir), "--steps", str(args.steps)]
        worker += ["--warmup", str(args.warmup), "--seq-length", str(args.seq_length)]
        worker += [
            "--global-batch-size",
            str(args.global_batch_size),
            "--micro-batch-size",
            str(args.micro_batch_size),
        ]
        done = subprocess.run(worker, capture_output=True, text=True, check=True)
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = args.seq_length * args.global_batch_size
    ours_step, theirs_step = statistics.median(ours), statistics.median(theirs)
    ours_rate, theirs_rate = tokens / ours_step, tokens / theirs_step
    print(f"Megatron (finetune.sh, LM + MTP): {ours_rate:8.0f} tokens/s  (median step {ours_step:.3f} s)")
    print(f"transformers (native, LM only):   {theirs_rate:8.0f} tokens/s  (median step {theirs_step:.3f} s)")
    print(f"ratio Megatron / transformers: {ours_rate / theirs_rate:.2f}x")


if __name__ == "__main__":
    main()
