"""plan_parallelism's command line: context parallelism (--cp, --seq-length) and the unchanged default output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mimo_v2_flash.planning.cli import _parser, main

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
    gradients: 2 * seq * (8 SWA KV heads / TP per rank, at least 1) * (192 + 128) * 2 bytes."""
    tokens = seq / (tp * cp)
    h, vocab, topk, ffn = 4096, 152576, 8, 2048
    stored = 48 * 34 * tokens * h + 47 * 2 * topk * tokens * (2 * h + 2 * ffn)
    stored += 3 * 34 * tokens * h + 4 * tokens * vocab * 4
    gathered = 2 * seq * max(8 // tp, 1) * (192 + 128) * 2 if cp > 1 else 0
    return (stored + gathered) / GIB


def _activations(out: str) -> float:
    match = re.search(r"^activations at \d+ tokens .*: ([\d.]+) GiB/rank", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_cp_divides_the_activation_estimate(capsys, cp):
    """TP 1 (8 SWA KV heads per rank) is the TP TransformerEngine's a2a CP runs with CP 2, 4 and 8."""
    seq = "131072"
    code, one, _ = _run(capsys, "--tp", "1", "--ep", "8", "--gpus", "8", "--seq-length", seq)
    assert code == 0
    code, split, _ = _run(
        capsys, "--tp", "1", "--ep", "8", "--cp", str(cp), "--gpus", str(8 * cp), "--seq-length", seq
    )
    assert code == 0
    assert f"x CP {cp} (DP 8)" in split
    assert _activations(one) == pytest.approx(_expected_activations_gib(131072, 1, 1), abs=0.05)
    assert _activations(split) == pytest.approx(_expected_activations_gib(131072, 1, cp), abs=0.05)
    # the per-token share falls by CP; what is left over is the gathered K/V (8 KV heads: 1.25 GiB here)
    assert _activations(split) == pytest.approx(_activations(one) / cp + 1.25, abs=0.1)


def test_cp_shards_the_distributed_optimizer_over_dp_times_cp(capsys):
    """GPUs = TP x PP x CP x DP; Megatron's distributed optimizer shards over DP x CP, so at a fixed GPU count
    trading DP for CP keeps the optimizer state per rank."""
    common = ["--tp", "1", "--ep", "64", "--gpus", "64", "--seq-length", "131072", "--distributed-optimizer"]
    results = {}
    for cp in ("1", "8"):
        code, out, _ = _run(capsys, *common, "--cp", cp)
        assert code == 0
        results[cp] = re.search(r"^full fine-tuning \(distributed optimizer\): ([\d.]+) \+", out, re.MULTILINE)[1]
    assert results["1"] == results["8"]
    assert "TP 1 x PP 1 x CP 8 (DP 8)" in out


def test_recommend_at_128k_on_h100_needs_full_recompute(capsys):
    """TE's a2a CP keeps TP x CP <= 8, so selective recompute holds at least 128k / 8 tokens' activations per rank,
    more than an H100: the LoRA layout that fits uses full recompute, and the overrides for it are printed."""
    assert _expected_activations_gib(131072, 8, 1) > 80
    code, out, _ = _run(capsys, "--recommend", "64", "--seq-length", "131072")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(" 64 GPUs, lora:"))
    assert "recompute full;" in line and "; fits 80 GiB" in line, line
    total = float(re.search(r"total ([\d.]+);", line)[1])
    assert total <= 80 - 8
    assert out.splitlines()[-1] == (
        "recompute full: pass finetune.sh model.recompute_granularity=full model.recompute_method=uniform "
        "model.recompute_num_layers=1"
    )


def _proposals(out: str) -> list[tuple[int, int, int, int, int, int]]:
    """(GPUs, TP, PP, CP, EP, ETP) of every layout a long-context --recommend printed."""
    pattern = r"^ *(\d+) GPUs, (?:full|lora): TP (\d+) PP (\d+) CP (\d+) EP (\d+) ETP (\d+) "
    return [tuple(map(int, match)) for match in re.findall(pattern, out, re.MULTILINE)]


@pytest.mark.parametrize("cp", [None, "2", "4", "8"])
@pytest.mark.parametrize("seq", ["131072", "262144"])
@pytest.mark.parametrize("memory", ["80", "141"])
def test_recommended_long_context_layouts_run_on_transformer_engine(capsys, cp, seq, memory):
    """Every proposal is one TransformerEngine runs: a2a splits each TP rank's 8 / TP SWA KV heads over CP."""
    from mimo_v2_flash.config import parse_architecture, released_family_configs
    from mimo_v2_flash.planning.parallel_layout import TE_CONTEXT_PARALLEL_MIN_VERSION, check_parallel_layout

    arch = parse_architecture(released_family_configs()["MiMo-V2-Flash"])
    argv = ["--recommend", "--seq-length", seq, "--gpu-memory-gb", memory] + (["--cp", cp] if cp else [])
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    proposals = _proposals(out)
    assert len(proposals) == 12, out
    for gpus, tp, pp, proposed_cp, ep, etp in proposals:
        assert proposed_cp == int(cp or proposed_cp)
        assert (8 // tp) % proposed_cp == 0, (tp, proposed_cp)
        check_parallel_layout(
            arch,
            tp,
            pp,
            ep,
            etp,
            cp=proposed_cp,
            world_size=gpus,
            seq_length=int(seq),
            transformer_engine=True,
            te_version=TE_CONTEXT_PARALLEL_MIN_VERSION,
        )


def test_full_recompute_is_offered_when_evaluating_a_layout(capsys):
    code, out, _ = _run(capsys, "--tp", "2", "--cp", "4", "--ep", "64", "--gpus", "64", "--seq-length", "131072")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("with full recompute: "))
    assert "model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1" in line
    assert float(re.search(r"full recompute: ([\d.]+) GiB", line)[1]) < _activations(out) / 4


def test_recommend_without_gpu_counts_plans_the_default_counts(capsys):
    code, out, _ = _run(capsys, "--recommend", "--seq-length", "262144", "--gpu-memory-gb", "141")
    assert code == 0
    lines = [line for line in out.splitlines()[1:] if " GPUs, " in line]
    counts = [int(line.split()[0]) for line in lines]
    assert counts == [n for n in (8, 16, 32, 64, 128, 256) for _ in range(2)]
    assert all(" CP " in line and "at 256k" in line for line in lines)


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
        (["--tp", "4", "--cp", "2", "--gpus", "12"], "not a multiple of tp*pp*cp = 8"),
        (["--seq-length", "524288"], "exceeds the model's max_position_embeddings=262144"),
        (
            ["--tp", "8", "--cp", "2", "--gpus", "16", "--seq-length", "131072"],
            "a rank holds 1 KV head(s) (8 / --tp 8)",
        ),
        (
            ["--tp", "4", "--cp", "4", "--gpus", "16", "--seq-length", "131072"],
            "a rank holds 2 KV head(s) (8 / --tp 4)",
        ),
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


def test_a_layout_te_cannot_split_is_refused_with_a_remedy_the_planner_has(capsys):
    """TP 8 leaves each rank one SWA KV head, which a2a cannot split over CP 2: the one-line refusal suggests only
    the planner's own options (it has no --backend)."""
    argv = ["--tp", "8", "--ep", "8", "--cp", "2", "--gpus", "16", "--seq-length", "131072"]
    code, _, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert "a rank holds 1 KV head(s) (8 / --tp 8)" in lines[0] and "lower --tp or --cp" in lines[0], err
    offered = set(re.findall(r"--[a-z][a-z-]*", lines[0]))
    accepted = {flag for action in _parser()._actions for flag in action.option_strings}
    assert offered <= accepted, offered - accepted
