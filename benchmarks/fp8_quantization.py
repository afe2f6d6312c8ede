#!/usr/bin/env python
"""Throughput of the FP8 quantizer (``quantize_rows``) on MiMo-V2-Flash weight shapes, in memory, against the least
work any quantizer must do, measured in the same run.

    .venv/bin/python benchmarks/fp8_quantization.py [--repeats 5] [--threads N]

For each shape (a routed expert's ``gate_proj`` 2048 x 4096, a 4096 x 4096 projection, a layer's K and V on the
release's ``rank_fused:4`` layout, and a dense ``gate_proj`` 16384 x 4096), random bf16 weights are quantized in
128 x 128 blocks; the median of ``--repeats`` timed runs (after one warm-up) is compared with two baselines on the
same weight: ``weight.to(float8_e4m3fn)`` (one pass reading bf16 and writing FP8, no scaling: a floor no
block-scaled quantizer reaches) and ``weight.clone()`` (a memcpy of the input). What the export's file path adds
(reading the Megatron checkpoint, writing shards) is measured by ``benchmarks/conversion.py``; this is also the
whole cost of the in-memory stream that refits an FP8 rollout engine.

Prints per shape the milliseconds, the FP8 output rate (MB/s) and the ratios to both baselines, and an estimate
for the synthetic checkpoint of ``benchmarks/conversion.py`` (its FP8 bytes at the expert weight's rate).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimo_v2_flash.checkpoint.fp8_quantization import kv_row_maps, quantize_kv, quantize_rows
from mimo_v2_flash.checkpoint.fp8_scale_layouts import grid_rows

BLOCK = (128, 128)
CONVERSION_BENCH_FP8_BYTES = 4.41 * 1024**3  # benchmarks/conversion.py's checkpoint (64 experts)


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def grid_quantizer(weight: torch.Tensor):
    rows = weight.shape[0]
    row_map = grid_rows(rows, BLOCK[0])
    return lambda: quantize_rows({"w": weight}, {"w": row_map}, int(row_map[-1]) + 1, BLOCK[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int = 4096) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)

    k, v = weight(4 * 192), weight(4 * 128)
    kv_row_maps("rank_fused:4", 4, 192, 128, BLOCK[0])  # the layout exists (fails here, not inside the timing)
    cases = {
        "expert gate_proj 2048x4096": (weight(2048),),
        "projection 4096x4096": (weight(4096),),
        "K 768x4096 + V 512x4096, rank_fused:4": (k, v),
        "dense gate_proj 16384x4096": (weight(16384),),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    expert_rate = None
    for name, weights in cases.items():
        if len(weights) == 1:
            quantize = grid_quantizer(weights[0])
        else:
            quantize = lambda w=weights: quantize_kv(w[0], w[1], 4, BLOCK, "rank_fused:4")  # noqa: E731
        elements = sum(w.numel() for w in weights)
        ms = median_ms(quantize, args.repeats)
        cast_ms = median_ms(lambda w=weights: [t.to(torch.float8_e4m3fn) for t in w], args.repeats)
        copy_ms = median_ms(lambda w=weights: [t.clone() for t in w], args.repeats)
        rate = elements / ms / 1e3
        expert_rate = expert_rate or rate
        print(
            f"{name}: {ms:.1f} ms ({rate:.0f} MB/s of FP8); plain cast {cast_ms:.1f} ms ({ms / cast_ms:.2f} x), "
            f"bf16 clone {copy_ms:.1f} ms ({ms / copy_ms:.2f} x)"
        )
    seconds = CONVERSION_BENCH_FP8_BYTES / (expert_rate * 1e6)
    print(
        f"benchmarks/conversion.py's {CONVERSION_BENCH_FP8_BYTES / 1024**3:.2f} GiB of FP8 at the expert rate: "
        f"{seconds:.1f} s of quantizing alone"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
