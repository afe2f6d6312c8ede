#!/usr/bin/env python
"""End-to-end demo on the built-in tiny MiMo-V2-Flash (CPU, no downloads).

1. write a tiny random MiMo-V2-Flash Hugging Face checkpoint (FP8 block-quantized, like the release);
2. import it into a Megatron distributed checkpoint (convert_checkpoints.py import);
3. generate from the Megatron checkpoint (generate.py --megatron-path);
4. export it back to HF BF16 shards (convert_checkpoints.py export);
5. load the export with transformers' native model and check that its logits agree with Megatron's;
6. fine-tune the FP8 checkpoint on the shipped chat data (finetune.sh; imported on the fly);
7. export the fine-tuned model and 8. check it against the fine-tuned Megatron model the same way;
9. export the fine-tuned model in the source's own FP8 format (--dtype fp8) and 10. inspect it: the same scale
   layouts as the source, and the serving TPs at which vLLM / SGLang read it exactly;
11. write a tiny MiMo-V2 family checkpoint (V2.6-Flash style), 12. import it and 13. export it in its own format.

Every step runs the same command line a user would; outputs go to ``--workdir`` (default ``demo_outputs/``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def step(title: str, command: list[str], log: Path) -> None:
    """Run one command line: print it and its result; its full output goes to ``log``."""
    print(f"\n== {title}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with log.open("a") as out:
        out.write(f"\n== {title}\n$ {' '.join(command)}\n{done.stdout}")
    lines = [line.strip() for line in done.stdout.replace("\r", "\n").splitlines() if line.strip()]
    if done.returncode != 0:
        print("\n".join(lines[-15:]), file=sys.stderr)
        raise SystemExit(f"demo failed at step: {title} (full log: {log})")
    # A training run's result is its last loss report; every other step ends with its own result line.
    result = next((line for line in reversed(lines) if "lm loss" in line), lines[-1] if lines else "done")
    print(f"   {result}  ({time.perf_counter() - start:.1f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "demo_outputs", help="where the demo writes")
    args = parser.parse_args()
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    python = sys.executable
    log = work / "demo.log"
    print(f"full log of every step: {log}")
    hf_dir, megatron_dir, export_dir = work / "tiny_fp8_hf", work / "tiny_megatron", work / "tiny_export_hf"

    step(
        "1. tiny FP8 HF checkpoint",
        [python, str(HERE / "make_tiny_checkpoint.py"), "--output", str(hf_dir), "--fp8"],
        log,
    )
    step(
        "2. import HF -> Megatron",
        [
            python,
            str(HERE / "convert_checkpoints.py"),
            "import",
            "--hf-model",
            str(hf_dir),
            "--megatron-path",
            str(megatron_dir),
        ],
        log,
    )
    step(
        "3. generate from the Megatron checkpoint",
        [
            python,
            str(HERE / "generate.py"),
            "--megatron-path",
            str(megatron_dir),
            "--prompt",
            "The quick brown fox",
            "--max-new-tokens",
            "8",
            "--dump-logits",
            str(work / "megatron_logits.safetensors"),
        ],
        log,
    )
    step(
        "4. export Megatron -> HF BF16",
        [
            python,
            str(HERE / "convert_checkpoints.py"),
            "export",
            "--hf-model",
            str(hf_dir),
            "--megatron-path",
            str(megatron_dir),
            "--hf-path",
            str(export_dir),
        ],
        log,
    )
    step(
        "5. transformers loads the export; logits agree with Megatron",
        [
            python,
            str(HERE / "compare_logits.py"),
            "--hf-model",
            str(export_dir),
            "--prompt",
            "The quick brown fox",
            "--megatron-path",
            str(megatron_dir),
        ],
        log,
    )
    finetune_dir, finetuned_hf = work / "tiny_finetune", work / "tiny_finetuned_hf"
    step(
        "6. fine-tune (Megatron-Bridge's loop, LM + MTP loss)",
        ["bash", str(HERE / "finetune.sh"), "--hf-model", str(hf_dir), "--output", str(finetune_dir)]
        + ["--train-iters", "30", "--seq-length", "64", "--lr", "3e-3"],
        log,
    )
    step(
        "7. export the fine-tuned model (fp32: it was trained in fp32 on the CPU)",
        [python, str(HERE / "convert_checkpoints.py"), "export", "--hf-model", str(hf_dir)]
        + ["--megatron-path", str(finetune_dir), "--hf-path", str(finetuned_hf), "--dtype", "float32"],
        log,
    )
    step(
        "8. transformers loads the fine-tuned export; logits agree with the fine-tuned Megatron model",
        [python, str(HERE / "compare_logits.py"), "--hf-model", str(finetuned_hf)]
        + ["--megatron-path", str(finetune_dir)],
        log,
    )
    finetuned_fp8 = work / "tiny_finetuned_fp8_hf"
    step(
        "9. export the fine-tuned model in the release's FP8 format",
        [python, str(HERE / "convert_checkpoints.py"), "export", "--hf-model", str(hf_dir)]
        + ["--megatron-path", str(finetune_dir), "--hf-path", str(finetuned_fp8), "--dtype", "fp8"],
        log,
    )
    step(
        "10. FP8 scale layouts of the FP8 export, and the serving TPs that read it exactly",
        [python, str(HERE / "convert_checkpoints.py"), "inspect-fp8", "--hf-model", str(finetuned_fp8)],
        log,
    )
    family_hf, family_megatron, family_fp8 = work / "tiny_v26_hf", work / "tiny_v26_megatron", work / "tiny_v26_fp8"
    step(
        "11. tiny MiMo-V2 family checkpoint (V2.6-Flash style: fused qkv_proj in rank chunks, MXFP4 experts, towers)",
        [python, str(HERE / "make_tiny_checkpoint.py"), "--output", str(family_hf), "--family", "--mxfp4"],
        log,
    )
    step(
        "12. import it (the chunk count from the index, checked against every layer's scales)",
        [python, str(HERE / "convert_checkpoints.py"), "import", "--hf-model", str(family_hf)]
        + ["--megatron-path", str(family_megatron)],
        log,
    )
    step(
        "13. export it in its own format (fused FP8 qkv_proj, MXFP4 experts, towers copied)",
        [python, str(HERE / "convert_checkpoints.py"), "export", "--hf-model", str(family_hf)]
        + ["--megatron-path", str(family_megatron), "--hf-path", str(family_fp8), "--dtype", "fp8"],
        log,
    )
    print(f"\ndemo finished: outputs in {work}, full log in {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
