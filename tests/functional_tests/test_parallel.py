"""Model parallelism on CPU (gloo, torchrun): every layout gives the single-process logits; checkpoints reshard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mimo_testing import hf_state_dict, skip_unless_ranks_fit
from safetensors.torch import load_file

from mimo_v2_flash.config import MiMoV2FlashConfigError, parse_architecture
from mimo_v2_flash.planning.parallel_layout import check_parallel_layout
from mimo_v2_flash.runtime.cpu_adaptations import transformer_engine_absent
from mimo_v2_flash.tiny_checkpoint import tiny_config, write_tiny_checkpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples/models/mimo_v2_flash"
PROMPT = "3,14,15,92,65,35,89,79,32,38,46,26,43,38"
TOLERANCE = 1e-5


def _run(nproc: int, script: str, *args) -> subprocess.CompletedProcess:
    skip_unless_ranks_fit(nproc)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        if nproc > 1
        else [sys.executable]
    )
    result = subprocess.run(
        [*launcher, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _logits(nproc: int, out: Path, *source_and_layout) -> torch.Tensor:
    _run(
        nproc, "generate.py", *source_and_layout, "--prompt-ids", PROMPT, "--max-new-tokens", "2", "--dump-logits", out
    )
    return load_file(str(out))["logits"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("par") / "hf", mtp_layers=1, seed=31)


@pytest.fixture(scope="module")
def baseline(hf_dir, tmp_path_factory) -> torch.Tensor:
    return _logits(1, tmp_path_factory.mktemp("base") / "l.safetensors", "--hf-model", hf_dir)


LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "ep2": (2, ["--ep", "2"]),
    "tp2_ep2": (4, ["--tp", "2", "--ep", "2"]),
    "pp2_vp2": (2, ["--pp", "2", "--vp", "2"]),
    # The 14-token prompt is padded to 16 and cut into 4 chunks of 4: causal spans and the 4-token windows cross
    # every chunk boundary.
    "cp2": (2, ["--cp", "2"]),
    "cp2_tp2": (4, ["--cp", "2", "--tp", "2"]),
    "cp2_ep2": (4, ["--cp", "2", "--ep", "2"]),
    "cp2_pp2": (4, ["--cp", "2", "--pp", "2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_logits_equal_single_process(name, hf_dir, baseline, tmp_path):
    nproc, flags = LAYOUTS[name]
    logits = _logits(nproc, tmp_path / "l.safetensors", "--hf-model", hf_dir, *flags)
    assert (logits - baseline).abs().max().item() <= TOLERANCE


def test_single_process_logits_are_the_reference_models(hf_dir, baseline):
    """Every layout above is within 1e-5 of this baseline, so within 1e-4 of transformers' native model."""
    from transformers import MiMoV2FlashForCausalLM

    model = MiMoV2FlashForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([[int(token) for token in PROMPT.split(",")]])
    with torch.no_grad():
        reference = model.eval()(ids).logits[0]
    assert reference.shape == baseline.shape
    assert (reference - baseline).abs().max().item() <= 1e-4 - TOLERANCE


def test_tiny_model_exercises_tp_beyond_kv_heads(hf_dir):
    arch = parse_architecture(json.loads((hf_dir / "config.json").read_text()))
    assert arch.full_num_kv_heads == 1 < 2  # so the tp2 layouts above replicate the full layers' KV head


def test_checkpoints_reshard_both_ways_and_export_identically(hf_dir, baseline, tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    _run(
        2,
        "convert_checkpoints.py",
        "import",
        "--hf-model",
        hf_dir,
        "--megatron-path",
        sharded,
        "--tp",
        "2",
        "--ep",
        "2",
        "--etp",
        "1",
        "--dtype",
        "float32",
    )
    _run(1, "convert_checkpoints.py", "import", "--hf-model", hf_dir, "--megatron-path", single, "--dtype", "float32")
    from_sharded = _logits(1, tmp_path / "a.safetensors", "--megatron-path", sharded)
    to_sharded = _logits(
        2, tmp_path / "b.safetensors", "--megatron-path", single, "--tp", "2", "--ep", "2", "--etp", "1"
    )
    assert (from_sharded - baseline).abs().max().item() <= TOLERANCE
    assert (to_sharded - baseline).abs().max().item() <= TOLERANCE
    exports = []
    for name, source in (("exp_sharded", sharded), ("exp_single", single)):
        _run(
            1,
            "convert_checkpoints.py",
            "export",
            "--hf-model",
            hf_dir,
            "--megatron-path",
            source,
            "--hf-path",
            tmp_path / name,
        )
        exports.append(hf_state_dict(tmp_path / name))
    assert sorted(exports[0]) == sorted(exports[1])
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])


def test_context_parallel_import_writes_the_same_checkpoint(hf_dir, tmp_path):
    """Checkpoints are CP-agnostic: an import run by 2 context-parallel processes exports what one process's does."""
    _run(2, "convert_checkpoints.py", "import", "--hf-model", hf_dir, "--megatron-path", tmp_path / "cp2", "--cp", "2")
    _run(1, "convert_checkpoints.py", "import", "--hf-model", hf_dir, "--megatron-path", tmp_path / "one")
    exports = []
    for name in ("cp2", "one"):
        _run(1, "convert_checkpoints.py", "export", "--hf-model", hf_dir, "--megatron-path", tmp_path / name,
             "--hf-path", tmp_path / f"exp_{name}")  # fmt: skip
        exports.append(hf_state_dict(tmp_path / f"exp_{name}"))
    assert sorted(exports[0]) == sorted(exports[1])
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"tp": 3}, "num_attention_heads"),
        ({"tp": 3, "heads": 6}, "exceeds the 2 KV heads of sliding-window layers"),
        ({"tp": 2, "heads": 6, "vocab": 385}, "vocab_size"),
        ({"ep": 3}, "experts"),
        ({"pp": 3}, "num_hidden_layers"),
        ({"etp": 3}, "moe_intermediate_size"),
        ({"cp": 2, "seq_length": 66}, "divisible by 2 x cp = 4"),
        pytest.param(
            {"cp": 2, "transformer_engine": True},
            "TransformerEngine is not installed",
            marks=pytest.mark.skipif(not transformer_engine_absent(), reason="TransformerEngine is installed here"),
        ),
        ({"tp": 2, "world_size": 1}, "torchrun"),
        ({"ep": 2, "etp": 2, "world_size": 2}, "etp\\*ep\\*pp"),
    ],
)
def test_impossible_layouts_are_refused_before_loading(layout, message):
    heads, vocab = layout.pop("heads", 4), layout.pop("vocab", 384)
    arch = parse_architecture(tiny_config(num_attention_heads=heads, vocab_size=vocab))
    with pytest.raises(MiMoV2FlashConfigError, match=message):
        check_parallel_layout(arch, **layout)
