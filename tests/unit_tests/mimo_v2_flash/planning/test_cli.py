"""plan_parallelism's command line: context parallelism (--cp, --seq-length) and the unchanged default output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mimo_v2_flash.planning.cli import main

SCRIPT = Path(__file__).resolve().parents[4] / "examples/models/mimo_v2_flash/plan_parallelism.py"
GIB = 1024**3


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected_activations_gib(seq: int, tp: int, cp: int) -> float:
    """The estimate's definition for the released model at PP 1, written out here: 48 layers of 34 t h bytes,
    47 MoE layers adding 2 k t (2h + 2f), 3 MTP layers of 34 t h, fp32 logits 4 t V for the head and each MTP
    layer, t = seq / (tp * cp) tokens per rank; with CP, one layer's K/V of the whole sequence and their
    gradients: 2 * seq * (one KV head per rank at TP 8) * (192 + 128) * 2 bytes."""
    tokens = seq / (tp * cp)
    h, vocab, topk, ffn = 4096, 152576, 8, 2048
    stored = 48 * 34 * tokens * h + 47 * 2 * topk * tokens * (2 * h + 2 * ffn)
    stored += 3 * 34 * tokens * h + 4 * tokens * vocab * 4
    gathered = 2 * seq * 1 * (192 + 128) * 2 if cp > 1 else 0
    return (stored + gathered) / GIB


def _activations(out: str) -> float:
    match = re.search(r"^activations at \d+ tokens .*: ([\d.]+) GiB/rank", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_cp_divides_the_activation_estimate(capsys, cp):
    seq = "131072"
    code, one, _ = _run(capsys, "--tp", "8", "--ep", "8", "--gpus", "8", "--seq-length", seq)
    assert code == 0
    code, split, _ = _run(
        capsys, "--tp", "8", "--ep", "8", "--cp", str(cp), "--gpus", str(8 * cp), "--seq-length", seq
    )
    assert code == 0
    assert f"x CP {cp} (DP 1)" in split
    assert _activations(one) == pytest.approx(_expected_activations_gib(131072, 8, 1), abs=0.05)
    assert _activations(split) == pytest.approx(_expected_activations_gib(131072, 8, cp), abs=0.05)
    # the per-token share falls by CP; what is left over is the gathered K/V (0.16 GiB here)
    assert _activations(split) == pytest.approx(_activations(one) / cp + 0.16, abs=0.1)


def test_cp_shards_the_distributed_optimizer_over_dp_times_cp(capsys):
    """GPUs = TP x PP x CP x DP; Megatron's distributed optimizer shards over DP x CP, so at a fixed GPU count
    trading DP for CP keeps the optimizer state per rank."""
    common = ["--tp", "8", "--ep", "64", "--gpus", "64", "--seq-length", "131072", "--distributed-optimizer"]
    results = {}
    for cp in ("1", "8"):
        code, out, _ = _run(capsys, *common, "--cp", cp)
        assert code == 0
        results[cp] = re.search(r"^full fine-tuning \(distributed optimizer\): ([\d.]+) \+", out, re.MULTILINE)[1]
    assert results["1"] == results["8"]
    assert "TP 8 x PP 1 x CP 8 (DP 1)" in out


def test_recommend_at_128k_on_h100_proposes_context_parallelism(capsys):
    code, out, _ = _run(capsys, "--recommend", "64", "--seq-length", "131072")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(" 64 GPUs, lora:"))
    cp = int(re.search(r" CP (\d+) ", line)[1])
    assert cp > 1 and "; fits 80 GiB" in line, line
    total = float(re.search(r"total ([\d.]+);", line)[1])
    assert total <= 80 - 8
    # Without CP no layout of 64 GPUs fits: activations alone exceed an H100 at TP 8 (the most this model takes).
    assert _expected_activations_gib(131072, 8, 1) > 80
    code, out, _ = _run(capsys, "--recommend", "64", "--seq-length", "131072", "--cp", "1")
    assert code == 0
    assert all("CP 1 " in line and "does not fit" in line for line in out.splitlines()[1:]), out


def test_recommend_without_gpu_counts_plans_the_default_counts(capsys):
    code, out, _ = _run(capsys, "--recommend", "--seq-length", "262144", "--gpu-memory-gb", "141")
    assert code == 0
    counts = [int(line.split()[0]) for line in out.splitlines()[1:]]
    assert counts == [n for n in (8, 16, 32, 64, 128, 256) for _ in range(2)]
    assert all(" CP " in line and "at 256k" in line for line in out.splitlines()[1:])


def test_default_output_has_no_cp_field(capsys):
    """Invocations without --cp / --seq-length print what they printed before context parallelism."""
    code, out, _ = _run(capsys, "--recommend", "8")
    assert code == 0
    assert out.splitlines()[1] == (
        "  8 GPUs, full: TP 8 PP 1 EP 8 ETP 1 (DP 1) ->  649.8 GiB/rank (weights 72.2 + grads 144.4 + optimizer "
        "433.2; activations 4k 9.0, 32k 71.7; does not fit 80 GiB at 4k)"
    )
    code, out, _ = _run(capsys, "--tp", "8", "--ep", "8", "--gpus", "8")
    assert code == 0
    assert out.splitlines()[1:] == [
        "layout: TP 8 x PP 1 (DP 1), experts EP 8 x ETP 1, 8 GPUs",
        "per rank: 0.91B non-expert + 37.85B expert parameters; LoRA r=16: 348.6M trainable",
        "full fine-tuning (optimizer state not sharded): 649.8 GiB/rank -> does NOT fit in 68 GiB",
        "LoRA (frozen bf16 base):    78.0 GiB/rank -> does NOT fit in 68 GiB",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cp", "3", "--gpus", "24", "--seq-length", "131072"], "must be divisible by 2 x cp = 6"),
        (["--cp", "4", "--gpus", "32", "--seq-length", "131076"], "must be divisible by 2 x cp = 8"),
        (["--cp", "2", "--gpus", "8"], "not a multiple of tp*pp*cp = 16"),
        (["--seq-length", "524288"], "exceeds the model's max_position_embeddings=262144"),
    ],
)
def test_bad_layouts_give_a_one_line_error(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_bad_layout_from_the_script_exits_nonzero_without_a_traceback():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cp", "3", "--gpus", "24", "--seq-length", "131072"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --cp 3: the sequence length 131072 must be divisible by 2 x cp = 6 (each rank holds two of the "
        "2 x cp chunks)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
