"""finetune.sh end to end on CPU: FP8 HF -> import -> fine-tune -> export -> transformers agrees; resume; LoRA.

Each run is a real ``bash finetune.sh`` (torchrun, Megatron-Bridge's training loop, gloo). The oracles are
transformers' native model (on the exported weights) and, for LoRA, Megatron-Bridge's own unmerged adapter
forward and the PEFT library.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mimo_testing import hf_state_dict, skip_unless_ranks_fit
from safetensors.torch import load_file

from mimo_v2_flash.conversion.cli import main as convert_main
from mimo_v2_flash.runtime.compare_logits import main as compare_main
from mimo_v2_flash.runtime.cpu_adaptations import transformer_engine_absent
from mimo_v2_flash.tiny_checkpoint import (
    write_fp8_checkpoint,
    write_tiny_checkpoint,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples/models/mimo_v2_flash"
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: (\S+) \| mtp_1 loss: (\S+) \|")
GRAD_NORM = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| grad norm: (\S+) \|")
TRAIN_FLAGS = ["--seq-length", "64", "--global-batch-size", "4", "--lr", "3e-3"]

pytestmark = pytest.mark.slow


def run_finetune(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = ["bash", str(EXAMPLES / "finetune.sh"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd)


def finetune(*args: str | Path, cwd: Path | None = None) -> str:
    """Run ``bash finetune.sh ARGS``; returns its output (fails the test with the output's tail if it fails)."""
    done = run_finetune(*args, cwd=cwd)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def losses(log: str) -> dict[int, tuple[str, str]]:
    """``{iteration: (lm loss, mtp loss)}`` as printed by Megatron-Bridge's training log."""
    return {int(m.group(1)): (m.group(2), m.group(3)) for m in ITERATION.finditer(log)}


def model_tensors(iteration_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a Megatron torch_dist checkpoint (no optimizer state)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(iteration_dir))
    metadata = reader.read_metadata().state_dict_metadata
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if not key.startswith("optimizer.") and "_extra_state" not in key and hasattr(meta, "size")
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.fixture(scope="module")
def fp8_hf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    return write_fp8_checkpoint(write_tiny_checkpoint(root / "hf"), root / "hf_fp8")


@pytest.fixture(scope="module")
def sft_run(fp8_hf, tmp_path_factory) -> tuple[Path, str]:
    """Full fine-tuning from the FP8 HF checkpoint (imported on the fly), 6 steps, checkpoints at 3 and 6."""
    output = tmp_path_factory.mktemp("sft") / "run"
    log = finetune("--hf-model", fp8_hf, "--output", output, "--train-iters", 6, "--save-interval", 3, *TRAIN_FLAGS)
    return output, log


def test_sft_trains_lm_and_mtp(sft_run):
    output, log = sft_run
    steps = losses(log)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    first, last = steps[1], steps[6]
    assert float(last[0]) < float(first[0]) - 0.5, steps  # lm loss
    assert float(last[1]) < float(first[1]) - 0.5, steps  # MTP loss
    assert (output / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_sft_changes_every_trainable_parameter(sft_run):
    output, _ = sft_run
    before = model_tensors(output / "pretrained" / "iter_0000000")
    after = model_tensors(output / "iter_0000006")
    assert set(before) == set(after)
    buffers = [name for name in before if name.endswith("expert_bias") or "local_tokens_per_expert" in name]
    parameters = [name for name in before if name not in buffers]
    unchanged = [name for name in parameters if torch.equal(before[name], after[name])]
    assert not unchanged
    for kind in ("softmax_offset", "mlp.router.weight", "mtp.layers.0.", "embedding", "output_layer"):
        assert any(kind in name for name in parameters), kind
    # the aux-loss-free bias update is off by default: the router bias stays as loaded
    assert buffers and all(torch.equal(before[name], after[name]) for name in buffers if "expert_bias" in name)


def test_sft_export_matches_transformers(sft_run, fp8_hf, tmp_path):
    output, _ = sft_run
    exported = tmp_path / "hf_out"
    convert = convert_main
    assert convert(["export", "--hf-model", str(fp8_hf), "--megatron-path", str(output), "--hf-path", str(exported),
                    "--dtype", "float32"]) == 0  # fmt: skip
    compare = compare_main
    assert compare(["--hf-model", str(exported), "--megatron-path", str(output), "--tolerance", "1e-4"]) == 0


def test_resume_continues_exactly(sft_run, fp8_hf, tmp_path):
    output, log = sft_run
    resumed = tmp_path / "run"
    shutil.copytree(output, resumed, symlinks=True)
    shutil.rmtree(resumed / "iter_0000006")
    # what a run stopped after its step-3 checkpoint leaves behind
    (resumed / "latest_checkpointed_iteration.txt").write_text("3")
    shutil.copy2(resumed / "iter_0000003" / "train_state.pt", resumed / "latest_train_state.pt")
    log_resumed = finetune(
        "--hf-model", fp8_hf, "--output", resumed, "--train-iters", 6, "--save-interval", 3, *TRAIN_FLAGS
    )
    assert "Starting training loop at iteration 3" in log_resumed
    assert losses(log_resumed) == {step: value for step, value in losses(log).items() if step > 3}
    final, final_resumed = model_tensors(output / "iter_0000006"), model_tensors(resumed / "iter_0000006")
    assert all(torch.equal(final[name], final_resumed[name]) for name in final)


@pytest.fixture(scope="module")
def reference_log(sft_run, fp8_hf, tmp_path_factory) -> str:
    """One process, 3 steps from the imported base: what every parallel layout must reproduce."""
    output = tmp_path_factory.mktemp("reference") / "run"
    return finetune("--megatron-path", sft_run[0] / "pretrained", "--tokenizer", fp8_hf, "--output", output,
                    "--train-iters", 3, *TRAIN_FLAGS)  # fmt: skip


@pytest.fixture(scope="module")
def reference_losses(reference_log) -> dict[int, tuple[str, str]]:
    return losses(reference_log)


@pytest.fixture(scope="module")
def reference_norms(reference_log) -> dict[str, str]:
    return dict(GRAD_NORM.findall(reference_log))


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"], ["--ep", "2"]], ids=["tp2", "pp2", "ep2"])
def test_parallel_training_matches_one_process(sft_run, fp8_hf, reference_losses, reference_norms, tmp_path, layout):
    """``torchrun --no-python --nproc-per-node 2 finetune.sh``: TP 2 (sequence parallel, KV heads replicated on
    the 1-KV-head layers), PP 2 or EP 2 train the same model as one process."""
    skip_unless_ranks_fit(2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
    command += ["bash", str(EXAMPLES / "finetune.sh"), "--megatron-path", str(sft_run[0] / "pretrained")]
    command += ["--tokenizer", str(fp8_hf), "--output", str(tmp_path / "run"), "--train-iters", "3", *TRAIN_FLAGS]
    done = subprocess.run(command + layout, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    steps = losses(done.stdout + done.stderr)
    assert sorted(steps) == sorted(reference_losses) == [1, 2, 3]
    for step, (lm, mtp) in reference_losses.items():
        assert abs(float(steps[step][0]) - float(lm)) < 1e-5 and abs(float(steps[step][1]) - float(mtp)) < 1e-5
    # The norm used for clipping (clip_grad 1.0 is on: it clips these steps) is the one-process norm.
    norms = dict(GRAD_NORM.findall(done.stdout + done.stderr))
    assert norms == reference_norms and all(float(norm) > 1.0 for norm in norms.values()), (norms, reference_norms)


def logged_scalars(run: Path) -> dict[str, list[float]]:
    """``{tag: values by step}`` of a run's TensorBoard log: full precision (the log line rounds the grad norm)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb_logs"))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in ("lm loss", "mtp_1 loss", "grad-norm")}


def test_context_parallel_training_matches_one_process(sft_run, fp8_hf, tmp_path):
    """``--cp 2`` (local attention, K/V gathered, Megatron's load-balanced split, causal and sliding-window spans
    across the chunk boundaries) trains as one process with per-token loss sums: the same LM and MTP losses and
    grad norms. The records (31 to 40 tokens) are padded to 48: 4 chunks of 12, answers over the boundaries
    between ranks, so MTP's shifted targets and loss mask cross them. (Megatron-Core's per-rank MTP normalization
    logged half the MTP loss here and grad norms up to 1.4e-2 off; now all agree within 5e-7.)"""
    skip_unless_ranks_fit(2)
    common = ["--megatron-path", sft_run[0] / "pretrained", "--tokenizer", fp8_hf, "--train-iters", 3, *TRAIN_FLAGS]
    # What Megatron-Bridge requires of a CP fine-tune (the recipe sets it under --cp), here for one process too.
    reference = finetune(*common, "--output", tmp_path / "one", "model.calculate_per_token_loss=true",
                         "ddp.average_in_collective=false")  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
    command += ["bash", str(EXAMPLES / "finetune.sh"), *map(str, common), "--output", str(tmp_path / "cp2")]
    done = subprocess.run([*command, "--cp", "2"], capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert sorted(losses(reference)) == sorted(losses(log)) == [1, 2, 3]
    one, cp = logged_scalars(tmp_path / "one"), logged_scalars(tmp_path / "cp2")
    assert all(len(values) == 3 for values in one.values()) and min(one["mtp_1 loss"]) > 1.0, one
    for tag, values in one.items():
        assert all(abs(got - want) <= 1e-4 * abs(want) for got, want in zip(cp[tag], values, strict=True)), (cp, one)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cp", "2", "--seq-length", "66"], "divisible by 2 x cp = 4"),
        pytest.param(
            ["--cp", "2", "--backend", "te"],
            "TransformerEngine is not installed",
            marks=pytest.mark.skipif(not transformer_engine_absent(), reason="TransformerEngine is installed here"),
        ),
    ],
    ids=["seq_length", "te_backend"],
)
def test_context_parallel_runs_that_cannot_be_exact_are_refused_in_one_line(fp8_hf, tmp_path, flags, message):
    done = run_finetune("--hf-model", fp8_hf, "--output", tmp_path / "run", "--print-config", *flags)
    errors = [line for line in done.stderr.splitlines() if line.startswith("finetune:")]
    assert done.returncode != 0 and len(errors) == 1 and message in errors[0], done.stderr[-2000:]


def test_router_bias_update_and_config_overrides(sft_run, fp8_hf, tmp_path):
    """--router-bias-update-rate turns on the aux-loss-free bias update; key=value overrides reach the config."""
    base = sft_run[0] / "pretrained"
    output = tmp_path / "run"
    log = finetune(
        "--megatron-path", base, "--tokenizer", fp8_hf, "--output", output, "--train-iters", 5,
        "--router-bias-update-rate", "1e-2", *TRAIN_FLAGS, "train.train_iters=2", "logger.log_interval=1",
    )  # fmt: skip
    assert sorted(losses(log)) == [1, 2]
    before, after = model_tensors(base / "iter_0000000"), model_tensors(output / "iter_0000002")
    biases = [name for name in before if name.endswith("expert_bias")]
    assert biases and all(not torch.equal(before[name], after[name]) for name in biases)


def test_no_argument_run(tmp_path):
    """``bash finetune.sh`` alone: the built-in tiny model on the shipped data; the loss goes down."""
    log = finetune(cwd=tmp_path)
    steps = losses(log)
    assert sorted(steps) == list(range(1, 41))
    assert float(steps[40][0]) < float(steps[1][0]) / 2 and float(steps[40][1]) < float(steps[1][1]) / 2
    output = tmp_path / "mimo_v2_flash_finetune"
    assert (output / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert (output / "tiny_hf" / "config.json").is_file() and (output / "iter_0000040" / "metadata.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{bad}"], "bad.jsonl:1: not valid JSON"),
        (["--megatron-path", "{missing}"], "Megatron checkpoint directory not found"),
        (["--hf-model", "{tmp}"], "not a Hugging Face checkpoint (no config.json)"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--hf-model", "{truncated}"], "(truncated shard)"),
    ],
)
def test_bad_input_one_line_and_nothing_written(fp8_hf, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    truncated = tmp_path / "truncated_hf"
    shutil.copytree(fp8_hf, truncated)
    shard = max(truncated.glob("*.safetensors"), key=lambda path: path.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])
    values = {"{bad}": tmp_path / "bad.jsonl", "{missing}": tmp_path / "absent", "{tmp}": tmp_path}
    values["{truncated}"] = truncated
    output = tmp_path / "run"
    done = run_finetune(*[values.get(arg, arg) for arg in args], "--output", output)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr and not output.exists()


@pytest.fixture(scope="module")
def lora_run(sft_run, fp8_hf, tmp_path_factory) -> tuple[Path, str]:
    """LoRA from the imported base checkpoint of the SFT run."""
    base = sft_run[0] / "pretrained"
    output = tmp_path_factory.mktemp("lora") / "run"
    log = finetune(
        "--megatron-path", base, "--tokenizer", fp8_hf, "--output", output, "--peft", "lora",
        "--train-iters", 5, *TRAIN_FLAGS[:-2], "--lr", "1e-2",
    )  # fmt: skip
    return output, log


def test_lora_trains_adapters_only(lora_run):
    output, log = lora_run
    steps = losses(log)
    assert float(steps[5][0]) < float(steps[1][0]) - 0.5, steps
    saved = model_tensors(output / "iter_0000005")
    assert saved and all(".adapter." in name for name in saved)  # the frozen base is not even saved
    targets = {name.split(".adapter.")[0].rsplit(".", 1)[-1] for name in saved}
    assert targets == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert any(".experts." in name for name in saved) and any(name.startswith("mtp.") for name in saved)


@pytest.fixture(scope="module")
def lora_exports(lora_run, fp8_hf, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The LoRA run exported merged (with its PEFT adapter), and its base checkpoint exported alone."""
    output, _ = lora_run
    root = tmp_path_factory.mktemp("lora_export")
    merged, adapter, base = root / "merged", root / "adapter", root / "base"
    convert = convert_main
    assert convert(["export", "--hf-model", str(fp8_hf), "--megatron-path", str(output), "--hf-path", str(merged),
                    "--dtype", "float32", "--adapter-path", str(adapter)]) == 0  # fmt: skip
    run_config = (output / "iter_0000005" / "run_config.yaml").read_text()
    base_dir = re.search(r"pretrained_checkpoint: (\S+)", run_config).group(1)
    assert convert(["export", "--hf-model", str(fp8_hf), "--megatron-path", base_dir, "--hf-path", str(base),
                    "--dtype", "float32"]) == 0  # fmt: skip
    return merged, adapter, base


def test_lora_merged_export_matches_megatron_adapters(lora_run, lora_exports):
    """transformers on the merged export == Megatron-Bridge's LoRA model (adapters unmerged); the base differs."""
    output, _ = lora_run
    merged, _, base = lora_exports
    compare = compare_main
    assert compare(["--hf-model", str(merged), "--megatron-path", str(output), "--tolerance", "1e-4"]) == 0
    assert compare(["--hf-model", str(base), "--megatron-path", str(output), "--tolerance", "1e-4"]) == 1


def test_lora_merged_equals_base_plus_adapter(lora_exports):
    merged, adapter, base = lora_exports
    base_state, merged_state = hf_state_dict(base), hf_state_dict(merged)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapted = 0
    for name, weight in merged_state.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in factors:
            delta = factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]
            torch.testing.assert_close(weight, base_state[name] + scale * delta, rtol=0, atol=1e-6)
            assert not torch.equal(weight, base_state[name]), name
            adapted += 1
        else:
            assert torch.equal(weight, base_state[name]), name  # norms, router, sinks, embeddings: frozen
    assert adapted == len(factors) // 2
    assert any(".experts.3.down_proj" in name for name in factors)
    assert any(name.startswith("base_model.model.model.mtp.") for name in factors)
    expected_targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == expected_targets


def test_lora_adapter_loads_in_peft(lora_exports):
    """The PEFT library applies the adapter to transformers' model of the base and merges it as we do.

    transformers fuses routed experts into one parameter, so PEFT there covers attention and dense MLPs; the
    experts' adapters are checked against the merged export above.
    """
    import peft
    from transformers import MiMoV2FlashForCausalLM

    merged, adapter, base = lora_exports
    model = MiMoV2FlashForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(model, str(adapter))
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    kinds = {name.rsplit(".", 1)[-1] for name in wrapped}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    peft_merged = peft_model.merge_and_unload().state_dict()
    ours = hf_state_dict(merged)
    for name in wrapped:
        key = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(peft_merged[key], ours[key], rtol=0, atol=1e-6)


def test_print_config_shows_the_gpu_configuration_from_a_config_only_directory(tmp_path):
    """``--backend te --print-config``: the GPU configuration, on any host, without weights or training."""
    import yaml

    from mimo_v2_flash.config import released_config, with_native_fields

    model_dir = tmp_path / "MiMo-V2-Flash"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(with_native_fields(released_config())))
    write_tokenizer(model_dir, 384)
    output = tmp_path / "run"
    args = ["--hf-model", model_dir, "--tp", "8", "--ep", "8", "--output", output, "--print-config"]

    def printed(*flags) -> dict:
        done = run_finetune(*args, *flags)
        assert done.returncode == 0, done.stderr[-4000:]
        return yaml.safe_load(done.stdout)

    gpu = printed("--backend", "te")
    model, ddp = gpu["model"], gpu["ddp"]
    assert model["use_transformer_engine"] is True and model["moe_grouped_gemm"] is True
    assert model["moe_token_dispatcher_type"] == "alltoall" and model["expert_tensor_parallel_size"] == 1
    assert model["sequence_parallel"] is True and model["bf16"] is True and model["recompute_granularity"]
    assert model["num_layers"] == 48 and model["num_moe_experts"] == 256
    assert ddp["use_distributed_optimizer"] is True and gpu["optimizer"]["use_distributed_optimizer"] is True
    assert not output.exists()  # nothing imported, nothing written
    here = printed("--backend", "local")
    assert here["model"]["use_transformer_engine"] is False and here["model"]["moe_grouped_gemm"] is False
