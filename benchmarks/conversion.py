#!/usr/bin/env python
"""Conversion memory and speed on a synthetic FP8 MiMo-V2-Flash checkpoint with the real layer shapes.

    .venv/bin/python benchmarks/conversion.py [--experts 64] [--workdir /tmp/mimo_bench] [--keep]
    .venv/bin/python benchmarks/conversion.py --ablate [--repeats 2] [--experts 16]

Builds a >= 2 GB checkpoint (hidden 4096, 64 heads, Q/K 192, V 128, 4/8 KV heads, expert intermediate 2048,
dense intermediate 16384, FP8 128x128 blocks with the released K|V layout, a few layers, smaller vocabulary),
then measures in one run, each command in its own process, after a `sync` so that no earlier write is still
being flushed:
  * `cp -r` of each direction's input (the FP8 HF checkpoint for import, the Megatron checkpoint for export),
    right before that direction's command: the baseline bytes/s,
  * `convert_checkpoints.py import` and `export`: peak RSS against the largest shard, and throughput against
    cp of the same input, for the whole command (interpreter and framework start included) and for the
    conversion alone (the seconds the command reports; the start-up is a constant that a 600 GB conversion
    does not notice),
  * `export --dtype fp8` (the source's own FP8 format) side by side with the BF16 export: the same input, half the
    bytes written; its speed is given against cp of what it writes (the issue's goal) and of what it reads,
  * `import` again from the exported HF BF16 checkpoint, where input and output are the same bytes.
FP8 -> BF16 import writes twice the bytes it reads, so its time is also given against cp of what it writes.
Goals (issue): peak RSS <= 2 x largest shard + 1 GiB, throughput >= 0.5 x cp.

--ablate measures instead, on the same synthetic checkpoint, what each of the conversion's memory mechanisms buys:
the import (and the export, for the mechanisms it runs through) with every mechanism on, then with each one switched
off in turn, for --repeats rounds (every other round in reverse order); the table gives medians. A mechanism is
switched off only in the benchmark's own child process, by patching it to the plain code before the conversion's
main runs (see ABLATIONS); the product code has no switch for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
CONVERT = REPO / "examples/models/mimo_v2_flash/convert_checkpoints.py"
GIB = 1024**3


def bench_config(experts: int, vocab: int) -> dict:
    from mimo_v2_flash.config import released_config

    cfg = released_config()
    cfg.update(
        vocab_size=vocab,
        num_hidden_layers=3,
        hybrid_layer_pattern=[0, 1, 1],
        moe_layer_freq=[0, 1, 1],
        n_routed_experts=experts,
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    )
    return cfg


def random_fp8(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random finite float8_e4m3fn values (bit patterns 0x7F / 0xFF are NaN and avoided)."""
    bits = torch.randint(0, 126, (rows, cols), dtype=torch.uint8, generator=gen)
    bits |= torch.randint(0, 2, (rows, cols), dtype=torch.uint8, generator=gen) << 7
    return bits.view(torch.float8_e4m3fn)


def write_checkpoint(directory: Path, cfg: dict, shard_bytes: int = 512 * 1024**2) -> None:
    """Write the synthetic checkpoint shard by shard (never more than one shard in memory)."""
    from mimo_v2_flash.checkpoint.fp8_quantization import quantize_kv
    from mimo_v2_flash.checkpoint.validation import expected_tensors
    from mimo_v2_flash.config import parse_architecture
    from mimo_v2_flash.tiny_checkpoint import is_fp8_quantized_in_release

    arch = parse_architecture(cfg)
    gen = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True)
    shard, shard_size, weight_map, index = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / name))
            weight_map.update({k: name for k in shard})
            shard, shard_size, index = {}, 0, index + 1

    expected = expected_tensors(arch, mtp_layers=1)
    for name, shape in expected.items():
        if name.endswith("self_attn.v_proj.weight") and name.replace("v_proj", "k_proj") in expected:
            continue  # quantized together with its K projection
        if name.endswith("self_attn.k_proj.weight"):
            # The released fused K|V layout, amax-scaled: the import decides every K/V pair's layout from its data.
            v_name = name.replace("k_proj", "v_proj")
            k = torch.randn(shape, generator=gen) * 0.02
            v = torch.randn(expected[v_name], generator=gen) * 0.02
            qk, sk, qv, sv = quantize_kv(k, v, shape[0] // 192, (128, 128), "fused_kv")
            tensors = {name: qk, name + "_scale_inv": sk, v_name: qv, v_name + "_scale_inv": sv}
        elif len(shape) == 2 and is_fp8_quantized_in_release(name):
            tensors = {
                name: random_fp8(*shape, gen),
                name + "_scale_inv": torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=gen) * 1e-3,
            }
        elif name.endswith("e_score_correction_bias"):
            tensors = {name: torch.rand(shape, generator=gen)}
        else:
            tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)}
        for key, tensor in tensors.items():
            shard[key] = tensor
            shard_size += tensor.numel() * tensor.element_size()
        if shard_size >= shard_bytes:
            flush()
    flush()
    total = sum((directory / f).stat().st_size for f in set(weight_map.values()))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(cfg))


def measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stdout) of a command run in its own process, started with nothing to flush."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, int(result.stderr.strip().splitlines()[-1]) * 1024 / GIB, result.stdout


def copy_seconds(source: Path, scratch: Path) -> float:
    seconds, _, _ = measured(["cp", "-r", str(source), str(scratch)])
    shutil.rmtree(scratch)
    return seconds


def reported_seconds(stdout: str) -> float:
    """The conversion time from the command's summary line ('imported N tensors (X MiB) in S s ...')."""
    found = re.search(r"(?:imported|exported) \d+ tensors \([0-9.]+ MiB\) in ([0-9.]+) s", stdout)
    if found is None:
        raise SystemExit(f"no summary line in the command's output:\n{stdout[-2000:]}")
    return float(found.group(1))


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


OFF_VARIABLE = "MIMO_BENCH_OFF"


def _switch_off_exact_storage_rewraps() -> None:
    from mimo_v2_flash.conversion import streaming_import

    # PyTorch's writer then clones a part of a larger storage itself, as it does without the re-wrap.
    streaming_import.owning_just_its_bytes = lambda tensor: tensor


def _switch_off_mmap_threshold() -> None:
    from mimo_v2_flash.conversion import commands

    commands.return_freed_memory_to_the_system = lambda: None


# name -> (what it is, switch-off patch, whether the export runs through it). The mechanisms measured without a
# clear gain (recycled storages, scratch buffers, stacked reads, thread budget, huge pages) were removed: see
# docs/conversion_mechanisms.md.
ABLATIONS = {
    "exact-storage re-wraps": ("owning_just_its_bytes -> identity", _switch_off_exact_storage_rewraps, False),
    "mallopt threshold": ("no mallopt(M_MMAP_THRESHOLD)", _switch_off_mmap_threshold, True),
}


def convert_child(argv: list[str]) -> int:
    """The conversion CLI, with the mechanism named in $MIMO_BENCH_OFF (if any) switched off first."""
    off = os.environ.get(OFF_VARIABLE)
    if off:
        ABLATIONS[off][1]()
    from mimo_v2_flash.conversion.cli import main as cli_main

    return cli_main(argv)


def ablate(work: Path, hf: Path, largest: int, repeats: int) -> None:
    """Every mechanism on, then each one off in turn, ``repeats`` rounds (every other one in reverse order, so that
    a drift in the machine's load hits the baseline and each variant alike); prints the medians after each round."""
    child = [sys.executable, str(Path(__file__).resolve()), "--convert-child"]
    mcore, reference, export = work / "mcore", work / "mcore_ref", work / "export"
    imp = [*child, "import", "--hf-model", str(hf), "--megatron-path", str(mcore), "--overwrite"]
    exp = [*child, "export", "--hf-model", str(hf), "--megatron-path", str(reference), "--hf-path", str(export)]
    exp += ["--max-shard-gb", f"{largest / GIB:.3f}", "--overwrite"]
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}

    def run(direction: str, off: str) -> None:
        env = {OFF_VARIABLE: off}
        seconds, rss, out = measured(imp if direction == "import" else exp, env)
        if direction == "import" and not reference.exists():
            mcore.rename(reference)  # the first baseline import is the export's input
        shutil.rmtree(mcore if direction == "import" else export, ignore_errors=True)
        runs.setdefault((direction, off), []).append((reported_seconds(out), seconds, rss))
        print(
            f"  {direction} {off or 'all on':24}: conversion {reported_seconds(out):6.1f} s, "
            f"command {seconds:6.1f} s, peak RSS {rss:.2f} GiB",
            flush=True,
        )

    imports = [("import", ""), *(("import", name) for name in ABLATIONS)]
    exports = [("export", ""), *(("export", name) for name, (_, _, in_export) in ABLATIONS.items() if in_export)]
    exports = exports if len(exports) > 1 else []  # no mechanism that the export runs through
    goal = (2 * largest + GIB) / GIB
    for round_ in range(repeats):
        print(f"round {round_ + 1} of {repeats}", flush=True)
        order = imports + exports if round_ % 2 == 0 else imports[::-1] + exports[::-1]
        if round_ % 2 == 1 and not reference.exists():
            order = imports + exports
        for direction, off in order:
            run(direction, off)
        print(f"\nmedians of {round_ + 1} run(s) each; peak RSS goal <= {goal:.2f} GiB")
        header = f"| {'direction':9} | {'mechanism switched off':24} | {'as':38} | conversion s on / off (off/on) "
        header += "| command s on / off (off/on) | peak RSS GiB on / off (off/on) |"
        print(header)
        print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
        for direction, off in imports[1:] + exports[1:]:
            on = [statistics.median(column) for column in zip(*runs[direction, ""], strict=True)]
            off_ = [statistics.median(column) for column in zip(*runs[direction, off], strict=True)]
            cells = [f"{a:.1f} / {b:.1f} ({b / a:.2f})" for a, b in zip(on[:2], off_[:2], strict=True)]
            cells.append(f"{on[2]:.2f} / {off_[2]:.2f} ({off_[2] / on[2]:.2f})")
            print(f"| {direction:9} | {off:24} | {ABLATIONS[off][0]:38} | " + " | ".join(cells) + " |", flush=True)


def main() -> int:
    if sys.argv[1:2] == ["--convert-child"]:
        return convert_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64, help="experts per MoE layer (default 64)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (default 32768)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--ablate", action="store_true", help="measure each memory mechanism on and off instead")
    parser.add_argument("--repeats", type=int, default=2, help="--ablate: alternated on/off rounds (default 2)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mimo_bench_"))
    try:
        hf = work / "hf_fp8"
        if not hf.exists():
            print("writing the synthetic checkpoint ...", flush=True)
            write_checkpoint(hf, bench_config(args.experts, args.vocab))
        shards = sorted(hf.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        print(
            f"checkpoint: {total / GIB:.2f} GiB in {len(shards)} shards, largest {largest / GIB:.2f} GiB", flush=True
        )
        if args.ablate:
            ablate(work, hf, largest, args.repeats)
            return 0
        py = sys.executable
        cp_import = copy_seconds(hf, work / "copy")
        imp_s, imp_rss, imp_out = measured(
            [py, str(CONVERT), "import", "--hf-model", str(hf), "--megatron-path", str(work / "mcore")]
        )
        mcore_bytes = directory_bytes(work / "mcore")
        cp_export = copy_seconds(work / "mcore", work / "copy")
        export = [py, str(CONVERT), "export", "--hf-model", str(hf), "--megatron-path", str(work / "mcore")]
        shard_limit = ["--max-shard-gb", f"{largest / GIB:.3f}"]
        exp_s, exp_rss, exp_out = measured([*export, "--hf-path", str(work / "export"), *shard_limit])
        fp8_s, fp8_rss, fp8_out = measured(
            [*export, "--hf-path", str(work / "export_fp8"), *shard_limit, "--dtype", "fp8"]
        )
        fp8_bytes = directory_bytes(work / "export_fp8")
        cp_fp8 = copy_seconds(work / "export_fp8", work / "copy")
        shutil.rmtree(work / "export_fp8")
        shutil.rmtree(work / "mcore")  # disk space for the BF16 round
        export_bytes = directory_bytes(work / "export")
        cp_bf16 = copy_seconds(work / "export", work / "copy")
        bf16_s, bf16_rss, bf16_out = measured(
            [py, str(CONVERT), "import", "--hf-model", str(work / "export"), "--megatron-path", str(work / "mcore")]
        )
        shutil.rmtree(work / "mcore")
        _, base_rss, _ = measured([py, "-c", "import mimo_v2_flash.conversion.commands"])
        goal = (2 * largest + GIB) / GIB
        imp_converting = reported_seconds(imp_out)
        print(f"baseline: importing the framework alone peaks at {base_rss:.2f} GiB RSS")
        rows = (
            ("import", total, cp_import, imp_s, imp_converting, imp_rss),
            ("export", mcore_bytes, cp_export, exp_s, reported_seconds(exp_out), exp_rss),
            ("export --dtype fp8", mcore_bytes, cp_export, fp8_s, reported_seconds(fp8_out), fp8_rss),
            ("import from BF16", export_bytes, cp_bf16, bf16_s, reported_seconds(bf16_out), bf16_rss),
        )
        for name, nbytes, cp_s, seconds, converting, rss in rows:
            print(
                f"{name}: input {nbytes / GIB:.2f} GiB; cp -r {cp_s:.1f} s ({nbytes / cp_s / 1024**2:.0f} MB/s); "
                f"command {seconds:.1f} s ({nbytes / seconds / 1024**2:.0f} MB/s, {cp_s / seconds:.2f} x cp); "
                f"conversion alone {converting:.1f} s ({nbytes / converting / 1024**2:.0f} MB/s, "
                f"{cp_s / converting:.2f} x cp); peak RSS {rss:.2f} GiB = {rss / (largest / GIB):.2f} x largest "
                f"shard (goal <= {goal:.2f} GiB: {'met' if rss <= goal else 'NOT met'})"
            )
        # FP8 -> BF16 doubles the bytes: the import writes the Megatron checkpoint, whose cp was timed for export.
        print(
            f"import output: {mcore_bytes / GIB:.2f} GiB written (cp -r of it {cp_export:.1f} s); against that cp, "
            f"command {cp_export / imp_s:.2f} x, conversion alone {cp_export / imp_converting:.2f} x"
        )
        fp8_converting = reported_seconds(fp8_out)
        print(
            f"export --dtype fp8 output: {fp8_bytes / GIB:.2f} GiB written (cp -r of it {cp_fp8:.1f} s); against "
            f"that cp, command {cp_fp8 / fp8_s:.2f} x, conversion alone {cp_fp8 / fp8_converting:.2f} x "
            f"(goal >= 0.5 x); BF16 export for comparison: {export_bytes / GIB:.2f} GiB written, command "
            f"{exp_s:.1f} s, peak RSS {exp_rss:.2f} GiB; FP8 export {fp8_s:.1f} s, peak RSS {fp8_rss:.2f} GiB"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
