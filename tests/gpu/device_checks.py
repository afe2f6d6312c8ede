#!/usr/bin/env python
"""The GPU route on first contact: one command, one line per check, non-zero exit on any failure.

    .venv/bin/python tests/gpu/device_checks.py [--workdir DIR]

Needs one CUDA GPU (H100/H200: well under 10 minutes). On a machine without CUDA it prints that it did not run and
exits 3. Without TransformerEngine the TE checks (2-4, and the TE fine-tunes) print SKIP with the reason, the others
run on the local backend on the GPU, and the exit code is 4 when those all pass. Checks:

1. versions: torch, TransformerEngine, cuDNN;
2. TE core attention at the released dims against an fp32 reference, forward and backward at 1k tokens (sink
   gradients included): a full-attention layer (64 Q heads, 4 KV heads, Q/K 192, V 128, causal, no sink) and an
   SWA layer (8 KV heads, window 128, learnable sink); which TE backend ran (fused / flash / unfused);
3. the SWA layer at 32k tokens with one TP-8 rank's heads: peak memory under 4 GiB (the unfused fallback would
   need 8 x 32k x 32k fp32 scores, 32 GiB);
4. TE vs local backend on the tiny model (bf16): logits and gradients within a bf16 tolerance;
5. FP8 tiny import on this (CUDA) host: every router bias equal to the source's;
   with 2+ GPUs and TE, CP 2 (TE a2a / p2p per layer kind) against one GPU: logits, and LM/MTP losses of a fine-tune;
6. 5-step fine-tunes (TE, else local backend), full and LoRA, each exported; transformers' logits agree with
   Megatron's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples/models/mimo_v2_flash"
NO_CUDA_EXIT = 3
WITHOUT_TE_EXIT = 4  # every check that could run passed; the TE checks were skipped
MEMORY_BOUND_GIB = 4.0
ATTENTION_TOLERANCE = 2e-2  # bf16 inputs; errors relative to the reference's largest magnitude
BACKEND_TOLERANCE = 5e-2


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def skip(name: str, reason: str) -> None:
    print(f"SKIP {name}: {reason}", flush=True)


def reference_attention(q, k, v, sink, window):
    """fp32 attention from the description: GQA, causal, optional window (W previous tokens) and sink column."""
    import torch

    seq, heads = q.shape[0], q.shape[2]
    groups = k.shape[2]
    q, k, v = (t.float().squeeze(1).transpose(0, 1) for t in (q, k, v))  # [heads, s, d]
    k = k.repeat_interleave(heads // groups, 0)
    v = v.repeat_interleave(heads // groups, 0)
    scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    pos = torch.arange(seq, device=q.device)
    forbidden = pos[None, :] > pos[:, None]
    if window is not None:
        forbidden |= pos[None, :] < pos[:, None] - window
    scores = scores.masked_fill(forbidden, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.float().view(-1, 1, 1).expand(heads, seq, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :seq]
    return (probs @ v).transpose(0, 1).reshape(seq, 1, -1)


def te_attention(kind: str, heads: int, kv_heads: int):
    """Our TE core attention for one layer kind, built the way the model builds it."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import MiMoV2FlashModelProvider
    from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.layer_specs import te_core_attention_class
    from mimo_v2_flash.config import FULL_ATTENTION, SLIDING_ATTENTION

    provider = MiMoV2FlashModelProvider(
        num_layers=2,
        hidden_size=heads * 128,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        swa_num_query_groups=kv_heads,
        kv_channels=192,
        v_head_dim=128,
        ffn_hidden_size=256,
        attention_layer_types=(FULL_ATTENTION, SLIDING_ATTENTION),
        sliding_window_size=128,
        vocab_size=256,
        use_transformer_engine=True,
        bf16=True,
        params_dtype=__import__("torch").bfloat16,
    )
    provider.finalize()
    from megatron.core.process_groups_config import ProcessGroupCollection

    layer = 1 if kind == FULL_ATTENTION else 2
    attention = te_core_attention_class()(
        provider, layer, AttnMaskType.causal, "self", pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    return attention.cuda()


def check_attention(kind: str, heads: int, kv_heads: int, seq: int, window, with_sink: bool, backends: list) -> bool:
    import torch

    attention = te_attention(kind, heads, kv_heads)
    sink = getattr(attention, "softmax_offset", None)
    if with_sink != isinstance(sink, torch.nn.Parameter):
        return report(
            f"TE attention {kind}", False, f"sink parameter present: {sink is not None}, expected {with_sink}"
        )
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda h, d: (seq, 1, h, d)  # noqa: E731
    q = torch.randn(*shape(heads, 192), device="cuda", generator=generator, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(
        *shape(kv_heads, 192), device="cuda", generator=generator, dtype=torch.bfloat16, requires_grad=True
    )
    v = torch.randn(
        *shape(kv_heads, 128), device="cuda", generator=generator, dtype=torch.bfloat16, requires_grad=True
    )
    backends.clear()
    out = attention(q, k, v, None)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grads = [q.grad.clone(), k.grad.clone(), v.grad.clone()] + ([sink.grad.clone()] if with_sink else [])
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_sink = sink.detach().float().requires_grad_() if with_sink else None
    reference = reference_attention(*leaves, ref_sink, window)
    reference.backward(grad_out.float())
    ref_grads = [t.grad for t in leaves] + ([ref_sink.grad] if with_sink else [])

    def error(a, b):
        return float((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-6))

    errors = [error(out, reference)] + [error(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    ran = sorted(set(backends)) or ["unknown (set NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to see it)"]
    names = ["out", "dq", "dk", "dv"] + (["dsink"] if with_sink else [])
    detail = ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors, strict=True)) + f"; backend {'/'.join(ran)}"
    return report(f"TE attention {kind} {seq} tokens", max(errors) < ATTENTION_TOLERANCE, detail)


def check_long_sequence_memory(backends: list) -> bool:
    import torch

    from mimo_v2_flash.config import SLIDING_ATTENTION

    seq, heads, kv_heads = 32768, 8, 1  # one TP-8 rank of an SWA layer
    attention = te_attention(SLIDING_ATTENTION, heads, kv_heads)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    q = torch.randn(seq, 1, heads, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(seq, 1, kv_heads, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(seq, 1, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    backends.clear()
    try:
        attention(q, k, v, None).sum().backward()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return report("TE attention SWA 32k tokens memory", False, "out of memory (an unfused fallback?)")
    peak = (torch.cuda.max_memory_allocated() - start) / 1024**3
    ran = "/".join(sorted(set(backends))) or "unknown"
    return report(
        "TE attention SWA 32k tokens memory",
        peak < MEMORY_BOUND_GIB,
        f"peak {peak:.2f} GiB (bound {MEMORY_BOUND_GIB}); backend {ran}",
    )


def check_te_vs_local(hf_dir: Path) -> bool:
    import torch

    from megatron.bridge import AutoBridge
    from mimo_v2_flash.runtime.inference import build_model, configure_provider

    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8]], device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda").unsqueeze(0)
    results = {}
    for use_te in (True, False):
        provider = AutoBridge.from_hf_pretrained(str(hf_dir)).to_megatron_provider(load_weights=True)
        provider.use_transformer_engine = use_te
        model = build_model(configure_provider(provider, torch.bfloat16))
        logits = model(ids, positions, None)
        logits.float().square().mean().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[use_te] = (logits.detach().float(), grads)
    (te_logits, te_grads), (local_logits, local_grads) = results[True], results[False]
    logit_error = float((te_logits - local_logits).abs().max() / local_logits.abs().max())
    common = sorted(set(te_grads) & set(local_grads))
    worst = max(float((te_grads[n] - local_grads[n]).norm() / local_grads[n].norm().clamp(min=1e-12)) for n in common)
    ok = logit_error < BACKEND_TOLERANCE and worst < BACKEND_TOLERANCE and len(common) == len(local_grads)
    detail = f"logits {logit_error:.1e}, worst gradient {worst:.1e} over {len(common)}/{len(local_grads)} parameters"
    return report("TE vs local backend (tiny, bf16)", ok, detail)


def run(command: list, log: Path) -> bool:
    """Run one step with its output in ``log``; a failing step's last lines are printed, so one run shows why."""
    with log.open("w") as handle:
        ok = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode == 0
    if not ok:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print(f"---- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail) + "\n----", flush=True)
    return ok


def check_fp8_import(fp8_dir: Path, work: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint

    python = sys.executable
    ok = run([python, EXAMPLES / "convert_checkpoints.py", "import", "--hf-model", fp8_dir, "--megatron-path",
              work / "mcore"], work / "import.log")  # fmt: skip
    ok = ok and run([python, EXAMPLES / "convert_checkpoints.py", "export", "--hf-model", fp8_dir, "--megatron-path",
                     work / "mcore", "--hf-path", work / "export"], work / "export.log")  # fmt: skip
    if not ok:
        return report("FP8 import on the CUDA host", False, f"command failed, see {work}/*.log")
    exported = {}
    for shard in (work / "export").glob("*.safetensors"):
        exported.update(load_file(str(shard)))
    source = FP8Checkpoint(HFCheckpoint(fp8_dir))
    biases = [n for n in source.weight_names() if n.endswith("e_score_correction_bias")]
    equal = [n for n in biases if torch.equal(exported[n], source.get(n, torch.float32))]
    return report(
        "FP8 import on the CUDA host",
        bool(biases) and equal == biases,
        f"router biases equal: {len(equal)}/{len(biases)}",
    )


def check_finetune(peft: str, hf_dir: Path, work: Path, backend: str) -> bool:
    python = sys.executable
    output, exported = work / f"run_{peft}", work / f"export_{peft}"
    steps = ["bash", EXAMPLES / "finetune.sh", "--hf-model", hf_dir, "--output", output, "--train-iters", "5",
             "--peft", peft, "--backend", backend, "--seq-length", "64", "--global-batch-size", "4"]  # fmt: skip
    ok = run(steps, work / f"finetune_{peft}.log")
    # A LoRA run's merged weight W + s*B@A is not a bf16 number: a bf16 export rounds it (logits moved by ~1e-2 on
    # the tiny model, seen on an H200), so the merge is checked exactly in fp32. A full run's bf16 weights export as
    # they are.
    dtype = ["--dtype", "float32"] if peft != "none" else []
    ok = ok and run([python, EXAMPLES / "convert_checkpoints.py", "export", "--hf-model", hf_dir, "--megatron-path",
                     output, "--hf-path", exported, *dtype], work / f"export_{peft}.log")  # fmt: skip
    ok = ok and run([python, EXAMPLES / "compare_logits.py", "--hf-model", exported, "--megatron-path", output],
                    work / f"compare_{peft}.log")  # fmt: skip
    return report(f"5-step fine-tune on {backend} ({peft}), export, transformers agree", ok, f"logs in {work}")


CP_PROMPT = ",".join(str((7 * i + 3) % 250) for i in range(64))  # windows and causal spans cross every chunk
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: (\S+) \| mtp_1 loss: (\S+) \|")


def check_context_parallel_te(hf_dir: Path, work: Path) -> bool:
    """CP 2 on TransformerEngine (a2a on the SWA and MTP layers, p2p on the full ones) against one GPU, bf16."""
    from safetensors.torch import load_file

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    logits = {}
    for name, launcher, flags in (("one", [sys.executable], []), ("cp2", torchrun, ["--cp", "2"])):
        out = work / f"cp_logits_{name}.safetensors"
        command = [*launcher, EXAMPLES / "generate.py", "--hf-model", hf_dir, "--prompt-ids", CP_PROMPT,
                   "--max-new-tokens", "0", "--dtype", "bfloat16", "--dump-logits", out, *flags]  # fmt: skip
        if not run(command, work / f"cp_generate_{name}.log"):
            return report("CP 2 on TE (a2a)", False, f"generate {name} failed")
        logits[name] = load_file(str(out))["logits"]
    logit_error = float((logits["cp2"] - logits["one"]).abs().max() / logits["one"].abs().max())
    losses = {}
    for name, flags in (("one", []), ("cp2", ["--nproc-per-node", "2", "--cp", "2"])):
        steps = ["bash", EXAMPLES / "finetune.sh", "--hf-model", hf_dir, "--output", work / f"cp_run_{name}",
                 "--train-iters", "3", "--backend", "te", "--seq-length", "64", "--global-batch-size", "4",
                 *flags]  # fmt: skip
        if not run(steps, work / f"cp_finetune_{name}.log"):
            return report("CP 2 on TE (a2a)", False, f"fine-tune {name} failed")
        text = (work / f"cp_finetune_{name}.log").read_text(errors="replace")
        losses[name] = [(float(lm), float(mtp)) for _, lm, mtp in LOSS.findall(text)]
    steps_logged = [len(losses["one"]), len(losses["cp2"])]
    pairs = [(a, b) for one, cp in zip(*losses.values(), strict=False) for a, b in zip(one, cp, strict=True)]
    loss_error = max(abs(b - a) / abs(a) for a, b in pairs) if pairs else float("inf")
    ok = logit_error < BACKEND_TOLERANCE and steps_logged == [3, 3] and loss_error < BACKEND_TOLERANCE
    detail = f"logits {logit_error:.1e}; LM and MTP losses over 3 steps {loss_error:.1e} (bf16)"
    return report("CP 2 on TE (a2a SWA/MTP, p2p full) vs one GPU", ok, detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where checkpoints and logs go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("NVTE_DEBUG", "1")
    os.environ.setdefault("NVTE_DEBUG_LEVEL", "2")
    import torch

    if not torch.cuda.is_available():
        print("device_checks: no CUDA device here: nothing was run", flush=True)
        return NO_CUDA_EXIT
    import importlib.util
    import logging

    started = time.perf_counter()
    te = importlib.util.find_spec("transformer_engine")
    te_version = __import__("transformer_engine").__version__ if te else "not installed"
    cudnn = torch.backends.cudnn.version()
    results = [report("versions", True, f"torch {torch.__version__}, TransformerEngine {te_version}, "
                      f"cuDNN {cudnn}, {torch.cuda.get_device_name()}")]  # fmt: skip

    backends: list[str] = []

    class BackendLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            for name in ("FusedAttention", "FlashAttention", "UnfusedDotProductAttention"):
                if f"Running with {name}" in message:
                    backends.append(name)

    logging.getLogger().addHandler(BackendLog())
    from mimo_v2_flash.config import FULL_ATTENTION, SLIDING_ATTENTION
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state
    from mimo_v2_flash.tiny_checkpoint import write_fp8_checkpoint, write_tiny_checkpoint

    initialize_parallel_state()
    checks = []
    if te is not None:
        checks += [
            lambda: check_attention(FULL_ATTENTION, 64, 4, 1024, None, False, backends),
            lambda: check_attention(SLIDING_ATTENTION, 64, 8, 1024, 128, True, backends),
            lambda: check_long_sequence_memory(backends),
        ]
    else:
        skip("TE attention (full, SWA), SWA 32k memory, TE vs local", "TransformerEngine is not installed")
    backend = "te" if te is not None else "local"
    with tempfile.TemporaryDirectory(prefix="mimo_device_checks_") as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        hf_dir = write_tiny_checkpoint(work / "tiny_hf")
        fp8_dir = write_fp8_checkpoint(hf_dir, work / "tiny_fp8")
        checks += [lambda: check_te_vs_local(hf_dir)] if te is not None else []
        if te is not None and torch.cuda.device_count() >= 2:
            checks += [lambda: check_context_parallel_te(hf_dir, work)]
        else:
            found = f"{torch.cuda.device_count()} GPU(s)" + ("" if te is not None else ", no TransformerEngine")
            skip("CP 2 on TE (a2a)", f"needs 2 GPUs with TransformerEngine; found {found}")
        checks += [
            lambda: check_fp8_import(fp8_dir, work / "fp8"),
            lambda: check_finetune("none", hf_dir, work, backend),
            lambda: check_finetune("lora", hf_dir, work, backend),
        ]
        (work / "fp8").mkdir(exist_ok=True)
        for check in checks:
            try:
                results.append(check())
            except Exception as error:  # a check that crashes is a failed check; the others still run
                results.append(report(getattr(check, "__name__", "check"), False, f"{type(error).__name__}: {error}"))
    failed = results.count(False)
    print(f"device_checks: {len(results) - failed}/{len(results)} passed in {time.perf_counter() - started:.0f} s")
    if failed:
        return 1
    return 0 if te is not None else WITHOUT_TE_EXIT


if __name__ == "__main__":
    sys.exit(main())
