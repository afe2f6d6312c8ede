"""convert_checkpoints.py end to end: bit-exact round trips, the FP8 path, and bad input handled cleanly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mimo_testing import hf_state_dict
from safetensors.torch import load_file, save_file

from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint
from mimo_v2_flash.conversion.cli import main as convert_main
from mimo_v2_flash.tiny_checkpoint import write_fp8_checkpoint, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples/models/mimo_v2_flash"


convert = convert_main


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory) -> Path:
    """The tiny model stored in BF16 (router bias fp32), with 2 MTP layers."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("bf16") / "hf", mtp_layers=2, seed=11)
    for shard in directory.glob("*.safetensors"):
        state = load_file(str(shard))
        cast = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16) for k, v in state.items()}
        save_file(cast, str(shard), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16")))
    return directory


@pytest.fixture(scope="module")
def fp8_hf(tmp_path_factory) -> Path:
    base = write_tiny_checkpoint(tmp_path_factory.mktemp("fp8src") / "hf", mtp_layers=1, seed=12)
    return write_fp8_checkpoint(base, tmp_path_factory.mktemp("fp8") / "hf", block=(16, 16))


def _round_trip(hf_dir: Path, tmp_path: Path) -> Path:
    megatron_dir, export_dir = tmp_path / "megatron", tmp_path / "export"
    assert convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(megatron_dir)]) == 0
    assert (
        convert(
            [
                "export",
                "--hf-model",
                str(hf_dir),
                "--megatron-path",
                str(megatron_dir),
                "--hf-path",
                str(export_dir),
                "--max-shard-gb",
                "0.0001",
            ]
        )
        == 0
    )
    return export_dir


def test_bf16_round_trip_is_bit_exact(bf16_hf, tmp_path, parallel_state):
    export_dir = _round_trip(bf16_hf, tmp_path)
    original, exported = hf_state_dict(bf16_hf), hf_state_dict(export_dir)
    assert sorted(original) == sorted(exported)
    assert any(k.startswith("model.mtp.layers.1.") for k in exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    assert len(set(index["weight_map"].values())) > 1  # several shards were written


def test_import_on_a_cuda_host_produces_every_buffer_from_the_hf_weights(bf16_hf, tmp_path, parallel_state):
    """On a CUDA host Megatron-Core creates the router's expert_bias on ``torch.cuda.current_device()`` (a real
    device, not meta) while the model is built for the import: simulated here by answering the CPU."""
    megatron_dir, export_dir = tmp_path / "megatron", tmp_path / "export"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
        assert convert(["import", "--hf-model", str(bf16_hf), "--megatron-path", str(megatron_dir)]) == 0
    export = ["export", "--hf-model", str(bf16_hf), "--megatron-path", str(megatron_dir), "--hf-path", str(export_dir)]
    assert convert(export) == 0
    original, exported = hf_state_dict(bf16_hf), hf_state_dict(export_dir)
    biases = [name for name in original if name.endswith("e_score_correction_bias")]
    assert biases and all(original[name].abs().sum() > 0 for name in biases)
    for name in biases:
        assert torch.equal(exported[name], original[name]), name


def test_a_checkpoint_trained_with_te_exports_and_loads_on_this_host(bf16_hf, tmp_path, parallel_state):
    """The backend is chosen where a checkpoint is loaded: one whose run config records a TransformerEngine GPU
    run (TE, grouped GEMM, alltoall, fusions) exports and loads here, on the local backend."""
    from mimo_v2_flash.conversion.megatron_checkpoint import load_megatron_checkpoint

    megatron_dir, export_dir = tmp_path / "megatron", tmp_path / "export"
    assert convert(["import", "--hf-model", str(bf16_hf), "--megatron-path", str(megatron_dir)]) == 0
    run_config = next(megatron_dir.rglob("run_config.yaml"))
    text = run_config.read_text()
    for setting, gpu_value in (
        ("use_transformer_engine", "true"),
        ("moe_grouped_gemm", "true"),
        ("moe_token_dispatcher_type", "alltoall"),
        ("gradient_accumulation_fusion", "true"),
        ("use_cpu_initialization", "false"),
    ):
        text, count = re.subn(rf"(?m)^(  {setting}): .*$", rf"\1: {gpu_value}", text)
        assert count == 1, setting
    run_config.write_text(text)
    export = ["export", "--hf-model", str(bf16_hf), "--megatron-path", str(megatron_dir), "--hf-path", str(export_dir)]
    assert convert(export) == 0
    original, exported = hf_state_dict(bf16_hf), hf_state_dict(export_dir)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())
    model = load_megatron_checkpoint(megatron_dir, torch.float32)
    assert model.config.use_transformer_engine is False and not model.config.moe_grouped_gemm
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]]), torch.arange(3).unsqueeze(0), None)).all()


def test_fp8_round_trip_equals_bf16_of_dequantized(fp8_hf, tmp_path, parallel_state):
    export_dir = _round_trip(fp8_hf, tmp_path)
    reader = FP8Checkpoint(HFCheckpoint(fp8_hf))
    exported = hf_state_dict(export_dir)
    assert sorted(exported) == sorted(reader.weight_names())
    for name in reader.weight_names():
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert torch.equal(exported[name], reader.get(name, dtype)), name
    config = json.loads((export_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert (
        config["layer_types"]
        and config["hybrid_layer_pattern"]
        and config["sliding_window"] == config["sliding_window_size"] + 1
    )
    assert (export_dir / "tokenizer.json").is_file()
    # Every record file of the Megatron checkpoint is an intact zip (torch.save's CRC32 written and correct).
    records = sorted((tmp_path / "megatron").rglob("*.distcp"))
    assert records and all(zipfile.ZipFile(path).testzip() is None for path in records)


def test_transformers_loads_export_and_agrees_with_megatron(fp8_hf, tmp_path):
    """The demo's last steps as a user runs them (separate processes)."""
    megatron_dir, export_dir = tmp_path / "megatron", tmp_path / "export"
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)  # noqa: E731
    assert (
        run(
            EXAMPLES / "convert_checkpoints.py", "import", "--hf-model", fp8_hf, "--megatron-path", megatron_dir
        ).returncode
        == 0
    )
    logits_file = tmp_path / "logits.safetensors"
    gen = run(
        EXAMPLES / "generate.py",
        "--megatron-path",
        megatron_dir,
        "--prompt-ids",
        "5,6,7,8,9",
        "--max-new-tokens",
        "3",
        "--dump-logits",
        logits_file,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "generated ids:" in gen.stdout
    assert load_file(str(logits_file))["logits"].shape == (5, 384)
    assert (
        run(
            EXAMPLES / "convert_checkpoints.py",
            "export",
            "--hf-model",
            fp8_hf,
            "--megatron-path",
            megatron_dir,
            "--hf-path",
            export_dir,
        ).returncode
        == 0
    )
    check = run(EXAMPLES / "compare_logits.py", "--hf-model", export_dir, "--megatron-path", megatron_dir)
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert "OK:" in check.stdout


def test_inspect_fp8_reports_layout_and_evidence(fp8_hf, capsys):
    assert convert(["inspect-fp8", "--hf-model", str(fp8_hf)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The release's rule: one KV head per rank on full layers (fused_kv_split), two on SWA layers (whole blocks).
    v_line = next(line for line in lines if line.startswith("full.self_attn.v_proj:"))
    assert "'fused_kv_split': 2" in v_line and re.search(r"fused_kv_split[^;]* (\d+)/\1$", v_line), v_line
    assert "(rejected for 2 tensors)" in v_line  # the other candidates that fit the shapes, with their counts
    swa_line = next(line for line in lines if line.startswith("swa.self_attn.v_proj:"))
    assert "layout {'grid': 2}" in swa_line, swa_line
    assert any(line.startswith("experts.gate_proj:") and "'grid'" in line for line in lines)
