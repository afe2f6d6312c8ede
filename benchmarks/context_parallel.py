#!/usr/bin/env python
"""Peak step memory per rank vs sequence length of the tiny MiMo-V2-Flash under context parallelism 1 and 2.

    .venv/bin/python benchmarks/context_parallel.py [--seq-lengths 1024 2048 4096 8192] [--cp-sizes 1 2]
        [--hidden-size 64] [--num-layers 4] [--json out.json]

Writes a random tiny checkpoint into a temporary directory (``tiny_config`` with the given hidden size and layer
count, one MTP layer, positions up to the longest sequence) and, for each CP size, starts ``torchrun`` (gloo, CPU,
also on a CUDA host) with that many ranks, the threads split evenly over them. Each rank loads the model through
the bridge as ``generate.py --cp N`` does, in fp32, in training mode, with the MTP loss scale 0 as
``finetune.sh --cp N`` requires (the MTP layer still runs), and runs one training step per sequence length after
one unmeasured warm-up step: micro batch 1, forward with labels on its share of a random sequence (Megatron's
load-balanced split: chunks ``r`` and ``2N-1-r`` of ``2N``), backward of the summed per-token loss. The ranks'
weight gradients are not all-reduced (that is DDP's, in persistent buffers, outside the step) and no optimizer
steps. Nothing is written outside the temporary directory, unless ``--json`` names a file.

What is measured, per rank and step: **the peak of the bytes allocated by torch's CPU allocator during the step
that are still live**: activations saved for backward, temporaries, the gathered K/V and the weight gradients
(set to None before the step), but not the weights, the process's libraries, or what malloc keeps cached. It
comes from the torch profiler's memory events (``profile_memory=True``: every CPU tensor allocation and free,
reported with the running total), taken relative to the total when the step starts. It leaves out memory that
does not come from torch's allocator (gloo's internal buffers, oneDNN/BLAS scratch). As a cross-check the table
also shows the rise of the process's resident set during the step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before the step; Linux only). The ranks run with glibc's mmap threshold
fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that freed large blocks go back to the system and the resident
set follows the live allocations rather than malloc's caching; what remains of the difference is malloc's and the
libraries' own.

Expected: the local backend's attention materializes ``[heads, s_q, s_k]`` fp32 scores (scores, masked scores,
the softmax kept for backward, their gradients), so at these lengths the step's memory is mostly ``O(s^2)``
attention. Under CP each rank has ``s/N`` queries but gathers every rank's K/V, so its scores are ``s/N x s``: that
part falls to ``1/N``, while the gathered full-length K/V (``O(s)``, kept for backward; small here) and the weight
gradients do not shrink. Prints per sequence length the peak per rank (the larger of the ranks') at each CP size
and the ratio to the first CP size, all measured in the same run.

The defaults take about 3 minutes on 2 cores, and the CP 1 step at 8192 tokens needs about 7.5 GiB on top of
the process (about 9 GiB resident in all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "CP_BENCH_RESULT "
MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_allocated(prof) -> int:
    """Peak of the live CPU bytes allocated within the profiled window, relative to its start."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    # The reporter's running total is process-wide and keeps blocks freed outside profiled windows: count from
    # the total just before the window's first allocation.
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


def _report(record: dict) -> None:
    """Send one result line to the parent in a single ``write`` of the shared stdout pipe.

    Every rank writes to the same pipe. ``print`` issues the text and its newline as two writes when stdout is
    unbuffered (``PYTHONUNBUFFERED``, ``python -u``), so two ranks finishing together could join their records on
    one line; one write of less than ``PIPE_BUF`` bytes to a pipe is atomic.
    """
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (RESULT + json.dumps(record) + "\n").encode())


def worker(hf_dir: str, seq_lengths: list[int], seed: int) -> None:
    """One rank under torchrun: load the model, then one measured training step per sequence length."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.profiler import ProfilerActivity, profile

    from megatron.bridge import AutoBridge
    from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.context_parallel import local_positions
    from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime, cuda_literals_on_cpu
    from mimo_v2_flash.runtime.framework_logs import quiet_framework_logs
    from mimo_v2_flash.runtime.inference import build_model, configure_provider
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state

    cp = int(os.environ.get("WORLD_SIZE", "1"))
    with quiet_framework_logs(), cpu_runtime():
        initialize_parallel_state(cp=cp)
        rank = parallel_state.get_context_parallel_rank()
        provider = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider(load_weights=True)
        provider.mtp_loss_scaling_factor = 0.0  # what finetune.sh --cp N requires; the MTP layer still runs
        model = build_model(configure_provider(provider, torch.float32, cp=cp, parallel_output=True))
        model.train()
        vocab = provider.vocab_size
        # An unmeasured warm-up step first: the first step's one-time set-up (thread pools, lazy imports) is not
        # a sequence length's cost.
        for measured, seq in [(False, seq_lengths[0])] + [(True, seq) for seq in seq_lengths]:
            generator = torch.Generator().manual_seed(seed + seq)
            sequence = torch.randint(0, vocab, (seq + 1,), generator=generator)
            mine = local_positions(seq // cp, rank, cp) if cp > 1 else torch.arange(seq)
            tokens, labels = sequence[:-1][mine].unsqueeze(0), sequence[1:][mine].unsqueeze(0)
            positions = mine.unsqueeze(0)
            for parameter in model.parameters():
                parameter.grad = None
            dist.barrier()
            rss_before = _status_kib("VmRSS")
            hwm_ok = _reset_peak_rss()
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                with cuda_literals_on_cpu():  # Megatron's RoPE split pins a CPU tensor under CP
                    loss = model(tokens, positions, None, labels=labels, loss_mask=torch.ones_like(tokens))
                loss.sum().backward()
                del loss
            seconds = time.perf_counter() - start
            if not measured:
                continue
            hwm = _status_kib("VmHWM") if hwm_ok else None
            rss_rise = (hwm - rss_before) * 1024 if hwm is not None and rss_before is not None else None
            record = {"cp": cp, "rank": rank, "seq": seq, "peak_bytes": _peak_allocated(prof)}
            record.update(rss_rise_bytes=rss_rise, seconds=round(seconds, 2))
            _report(record)
            del prof


def tiny_benchmark_config(hidden_size: int, num_layers: int, max_positions: int) -> dict:
    """``tiny_config`` with ``num_layers`` layers (full/SWA as 0,1,1,0 repeated; the first dense, then MoE)."""
    from mimo_v2_flash.tiny_checkpoint import tiny_config

    pattern = ([0, 1, 1, 0] * num_layers)[:num_layers]
    return tiny_config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        hybrid_layer_pattern=pattern,
        moe_layer_freq=[0] + [1] * (num_layers - 1),
        max_position_embeddings=max_positions,
    )


def run_cp(cp: int, hf_dir: Path, args: argparse.Namespace) -> list[dict]:
    """Start ``cp`` ranks under torchrun; stream their results as progress lines."""
    # A fixed mmap threshold: glibc then maps every block of 64 KiB or more on its own and unmaps it when freed,
    # so the resident set follows the live allocations instead of glibc's adaptive caching. No CUDA device: the
    # CPU is measured on a CUDA host too.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // cp)), MALLOC_MMAP_THRESHOLD_="65536")
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cp)]
    command += [__file__, "--worker", str(hf_dir), "--seed", str(args.seed), "--seq-lengths"]
    command += [str(seq) for seq in args.seq_lengths]
    records = []
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env) as process:
            for line in process.stdout:
                if not line.startswith(RESULT):
                    continue
                record = json.loads(line[len(RESULT) :])
                records.append(record)
                rise = record["rss_rise_bytes"]
                rise_text = f", RSS rise {rise / MIB:8.1f} MiB" if rise is not None else ""
                print(
                    f"  cp {cp} rank {record['rank']} seq {record['seq']:6d}: peak {record['peak_bytes'] / MIB:8.1f} "
                    f"MiB{rise_text} ({record['seconds']:.1f} s, {time.perf_counter() - start:.0f} s elapsed)",
                    flush=True,
                )
        if process.returncode:
            log.seek(0)
            sys.exit(f"torchrun with {cp} ranks failed ({process.returncode}):\n{log.read()[-4000:]}")
    return records


def summarize(records: list[dict], seq_lengths: list[int], cp_sizes: list[int]) -> list[dict]:
    """Per sequence length: the largest rank's peak (and RSS rise) at each CP size, and ratios to the first."""
    rows = []
    for seq in seq_lengths:
        row: dict = {"seq": seq}
        for cp in cp_sizes:
            mine = [r for r in records if r["cp"] == cp and r["seq"] == seq]
            row[f"cp{cp}_peak_bytes"] = max(r["peak_bytes"] for r in mine)
            rises = [r["rss_rise_bytes"] for r in mine if r["rss_rise_bytes"] is not None]
            row[f"cp{cp}_rss_rise_bytes"] = max(rises) if rises else None
            row[f"cp{cp}_seconds"] = max(r["seconds"] for r in mine)
        base = cp_sizes[0]
        for cp in cp_sizes[1:]:
            row[f"cp{cp}_over_cp{base}"] = row[f"cp{cp}_peak_bytes"] / row[f"cp{base}_peak_bytes"]
            if row[f"cp{cp}_rss_rise_bytes"] and row[f"cp{base}_rss_rise_bytes"]:
                row[f"cp{cp}_over_cp{base}_rss"] = row[f"cp{cp}_rss_rise_bytes"] / row[f"cp{base}_rss_rise_bytes"]
        rows.append(row)
    return rows


def table(rows: list[dict], cp_sizes: list[int]) -> str:
    """The rows as a fixed-width text table (MiB)."""
    base = cp_sizes[0]
    header = ["seq"] + [f"CP{cp} peak/rank" for cp in cp_sizes] + [f"CP{cp}/CP{base}" for cp in cp_sizes[1:]]
    header += [f"CP{cp} RSS rise" for cp in cp_sizes] + [f"CP{cp}/CP{base} RSS" for cp in cp_sizes[1:]]
    lines = []
    for row in rows:
        cells = [str(row["seq"])] + [f"{row[f'cp{cp}_peak_bytes'] / MIB:.1f} MiB" for cp in cp_sizes]
        cells += [f"{row[f'cp{cp}_over_cp{base}']:.3f}" for cp in cp_sizes[1:]]
        cells += [
            f"{row[f'cp{cp}_rss_rise_bytes'] / MIB:.1f} MiB" if row[f"cp{cp}_rss_rise_bytes"] else "n/a"
            for cp in cp_sizes
        ]
        cells += [f"{row[f'cp{cp}_over_cp{base}_rss']:.3f}" if f"cp{cp}_over_cp{base}_rss" in row else "n/a"
                  for cp in cp_sizes[1:]]  # fmt: skip
        lines.append(cells)
    widths = [max(len(h), *(len(cells[i]) for cells in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out.append("-|-".join("-" * w for w in widths))
    out += [" | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (``--worker`` is the per-rank mode that torchrun starts)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2], help="the first is the baseline")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="split evenly over the ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the per-rank records and the table rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq_lengths = list(dict.fromkeys(args.seq_lengths))
    for seq in args.seq_lengths:
        bad = [cp for cp in args.cp_sizes if seq % (2 * cp)]
        if bad:
            parser.error(f"sequence length {seq} is not divisible by 2 x CP for CP {bad}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every CP size over every sequence length and print the table."""
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.seq_lengths, args.seed)
        return

    from mimo_v2_flash.tiny_checkpoint import write_tiny_checkpoint

    print(
        f"tiny model (hidden {args.hidden_size}, {args.num_layers} layers + 1 MTP), fp32, micro batch 1, "
        f"{args.threads} threads; sequence lengths {args.seq_lengths}; CP sizes {args.cp_sizes}",
        flush=True,
    )
    records = []
    with tempfile.TemporaryDirectory(prefix="mimo_cp_bench_") as tmp:
        cfg = tiny_benchmark_config(args.hidden_size, args.num_layers, max(args.seq_lengths))
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf", cfg)
        for cp in args.cp_sizes:
            print(f"CP {cp}: torchrun with {cp} rank(s)", flush=True)
            records += run_cp(cp, hf_dir, args)
    rows = summarize(records, args.seq_lengths, args.cp_sizes)
    print()
    print("peak = largest rank's peak of live torch CPU allocations during one forward+backward step")
    print(table(rows, args.cp_sizes))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "records": records,
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
