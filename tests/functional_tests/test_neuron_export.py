"""neuron_export end to end: CLI help, inspect, prepare, plan, compile (no SDK, fake SDK), and every bad input.

Bad input must give one line on stderr starting with ``error: ``, exit code 2, no traceback and no output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit_tests" / "neuron_export"))
from ne_helpers import (  # noqa: E402
    FAKE_NXDI,
    REAL_CONFIG,
    build_checkpoints,
    config,
    dequantized,
    edit_config,
    edit_tensors,
    fake_sdk_env,
)
from ne_reference import greedy  # noqa: E402

from neuron_export.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_LAYOUT = ["--tp", "4", "--ep", "4", "--moe-tp", "1", "--batch-size", "2", "--seq-len", "64"]
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("ne_functional"))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron_export", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)  # fmt: skip


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("command", [[], ["inspect"], ["prepare"], ["plan"], ["compile"]])
def test_help_is_fast_and_imports_no_framework(command):
    start = time.perf_counter()
    result = cli(*command, "--help")
    assert result.returncode == 0 and "usage: neuron_export" in result.stdout
    assert time.perf_counter() - start < 5
    # The parser is built too: a choice list imported from a torch module once made every --help import torch.
    code = "import sys, neuron_export.cli as cli; cli.build_parser(); print('torch' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_inspect_json_from_headers(ckpts):
    result = cli("inspect", "--hf-path", str(ckpts["fp8"]), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["problems"] == [] and report["format"] == "FP8"
    assert report["mtp_layers"] == 1 and report["num_experts"] == 4 and report["layout"] == "hub"
    assert [layer["attention"] for layer in report["layers"]] == ["full", "sliding", "sliding", "full"]
    assert set(report["bytes_by_dtype"]) == {"bfloat16", "float32", "float8_e4m3fn"}


def test_inspect_lists_every_problem(ckpts, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["fp8"], bad)
    edit_tensors(bad, lambda s: {k: v for k, v in s.items() if k not in (Q1 + "_scale_inv", "model.norm.weight")})
    code = main(["inspect", "--hf-path", str(bad)])
    captured = capsys.readouterr()
    assert code == 2 and "problems:    2" in captured.out
    assert "model.norm.weight is missing" in captured.out and f"FP8 weight {Q1} has no _scale_inv" in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "(+1 more listed above)" in captured.err


def test_prepare_cli_writes_manifest_and_nothing_else(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "--hf-path", str(ckpts["fp8"]), "--output", str(out)]) == 0
    assert "FP8 dequantized; MTP dropped" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left
    check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert {"tokenizer.json", "config.json", "model.safetensors.index.json"} <= listed


def _prepare_bad(ckpts, tmp_path, damage, source="fp8"):
    bad = tmp_path / "bad_hf"
    shutil.copytree(ckpts[source], bad)
    damage(bad)
    return ["prepare", "--hf-path", str(bad), "--output", str(tmp_path / "out" / "prepared")]


def _drop(*names):
    return lambda d: edit_tensors(d, lambda s: {k: v for k, v in s.items() if k not in names})


def _config(**changes):
    return lambda d: edit_config(d, lambda c: {k: v for k, v in {**c, **changes}.items() if v != "<drop>"})


PREPARE_CASES = {
    "non-MiMo checkpoint": (_config(model_type="llama", architectures=["LlamaForCausalLM"]), "not a MiMo-V2-Flash"),
    "missing tensor": (_drop("lm_head.weight"), "lm_head.weight is missing"),
    "FP8 scale missing": (_drop(Q1 + "_scale_inv"), "has no _scale_inv"),
    "tied embeddings": (_config(tie_word_embeddings=True), "tie_word_embeddings"),
    "routed scaling": (_config(routed_scaling_factor=2.5), "routed_scaling_factor"),
    "no config": (lambda d: (d / "config.json").unlink(), "config.json not found"),
    "FP8 without block size": (_config(quantization_config="<drop>"), "weight_block_size"),
}


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_prepare_bad_input(case, ckpts, tmp_path, capsys):
    damage, fragment = PREPARE_CASES[case]
    (tmp_path / "out").mkdir()
    line = one_line_error(capsys, main(_prepare_bad(ckpts, tmp_path, damage)))
    assert fragment in line, line
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_refuses_existing_output_prepared_input_and_overlap(ckpts, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    line = one_line_error(capsys, main(["prepare", "--hf-path", str(ckpts["source"]), "--output", str(existing)]))
    assert "already exists" in line and (existing / "keep.txt").read_text() == "precious"
    line = one_line_error(
        capsys, main(["prepare", "--hf-path", str(ckpts["prepared"]), "--output", str(tmp_path / "x")])
    )
    assert "already an NxDI-prepared checkpoint" in line
    inside = ckpts["source"] / "nested"
    line = one_line_error(capsys, main(["prepare", "--hf-path", str(ckpts["source"]), "--output", str(inside)]))
    assert "must not contain, or lie inside" in line and not inside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--batch-size", "1"], "use --batch-size >= 2"),
        (["--tp", "2", "--ep", "2"], "lies between the KV head counts"),
        (["--tp", "4", "--ep", "3", "--moe-tp", "1"], "must equal TP 4"),
    ],
)
def test_plan_infeasible(ckpts, capsys, args, fragment):
    code = main(["plan", "--hf-path", str(ckpts["fp8"]), *TINY_LAYOUT, *args])
    assert fragment in one_line_error(capsys, code)


def test_plan_real_config_only(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    assert main(["plan", "--hf-path", str(tmp_path), "--config-only", "--tp", "64", "--ep", "64"]) == 0
    assert "result     feasible" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({**REAL_CONFIG, "model_type": "llama", "architectures": []}))
    assert "not a MiMo-V2-Flash" in one_line_error(capsys, main(["plan", "--hf-path", str(tmp_path), "--config-only"]))


def test_compile_without_sdk_writes_bundle(ckpts, tmp_path, capsys):
    target = tmp_path / "compiled"
    args = ["compile", "--prepared", str(ckpts["prepared"]), "--compiled-path", str(target), *TINY_LAYOUT]
    line = one_line_error(capsys, main(args))
    assert "Neuron SDK not available" in line and "run_on_trn2.sh" in line
    assert sorted(p.name for p in target.iterdir()) == ["README.txt", "neuron_export_layout.json",
        "nxdi_compile_and_smoke.py", "run_on_trn2.sh", "serve_vllm.sh", "vllm_adapter_shim"]  # fmt: skip
    for script in ("run_on_trn2.sh", "serve_vllm.sh"):
        assert subprocess.run(["bash", "-n", str(target / script)]).returncode == 0
    serve = (target / "serve_vllm.sh").read_text()
    assert '"moe_ep_degree": 4' in serve and "--tensor-parallel-size 4" in serve and "quantized" not in serve
    assert json.loads((target / "neuron_export_layout.json").read_text())["ep"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["compiled"]


def test_compile_bad_input(ckpts, tmp_path, capsys):
    target = tmp_path / "compiled"
    hub = one_line_error(capsys, main(["compile", "--prepared", str(ckpts["source"]), "--compiled-path", str(target)]))
    assert "not a prepared checkpoint" in hub
    layout = one_line_error(capsys, main(["compile", "--prepared", str(ckpts["prepared"]), "--compiled-path",
                                          str(target), *TINY_LAYOUT, "--batch-size", "1"]))  # fmt: skip
    assert "layout infeasible" in layout
    tampered = tmp_path / "tampered"
    shutil.copytree(ckpts["prepared"], tampered)
    (tampered / "extra.bin").write_bytes(b"x")
    line = one_line_error(capsys, main(["compile", "--prepared", str(tampered), "--compiled-path", str(target)]))
    assert "not listed in SHA256SUMS" in line
    inside = ckpts["prepared"] / "compiled"
    code = main(["compile", "--prepared", str(ckpts["prepared"]), "--compiled-path", str(inside)])
    line = one_line_error(capsys, code)
    assert "must not contain, or lie inside" in line and not inside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered"]


def test_compile_with_fake_sdk_generates_like_the_source(ckpts, tmp_path, capsys, monkeypatch):
    for key, value in fake_sdk_env().items():
        monkeypatch.setenv(key, value)
    target = tmp_path / "compiled"
    args = ["compile", "--prepared", str(ckpts["prepared_fp8"]), "--compiled-path", str(target), *TINY_LAYOUT]
    code = main([*args, "--adapter-src", str(FAKE_NXDI), "--prompt", "The quick brown fox", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert {"model.pt", "neuron_config.json", "weights", "smoke_generation.json", "run_on_trn2.sh"} <= {
        p.name for p in target.iterdir()}  # fmt: skip
    smoke = json.loads((target / "smoke_generation.json").read_text())
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(ckpts["fp8"]))("The quick brown fox")["input_ids"]
    source = {k: v.to(torch.bfloat16) for k, v in dequantized(ckpts["fp8"]).items()}
    assert smoke["new_token_ids"] == greedy(source, config(ckpts["fp8"]), prompt, 4)


def test_compile_with_adapter_lacking_router_fix_fails_cleanly(ckpts, tmp_path, capsys, monkeypatch):
    for key, value in {**fake_sdk_env(), "FAKE_NXDI_NO_ROUTER_FIX": "1"}.items():
        monkeypatch.setenv(key, value)
    code = main(["compile", "--prepared", str(ckpts["prepared"]), "--compiled-path", str(tmp_path / "compiled"),
                 *TINY_LAYOUT, "--adapter-src", str(FAKE_NXDI)])  # fmt: skip
    assert "failed with exit code" in one_line_error(capsys, code)
    assert list(tmp_path.iterdir()) == []
