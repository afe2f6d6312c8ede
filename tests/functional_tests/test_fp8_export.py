"""``convert_checkpoints.py export --dtype fp8``: the source's own block-FP8 format written back, end to end.

Oracles: the tests' reference quantizer / dequantizer (``fp8_reference``, row by row), plain torch block maxima,
transformers' native model on dequantized weights, and a model of the vLLM / SGLang q/k/v scale loader written
here from the description of their source (never the package's ``fp8_serving``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import fp8_reference
import pytest
import torch
from mimo_testing import hf_logits, hf_state_dict
from safetensors.torch import save_file
from test_fp8_layouts import layer_layout, write_released_format

from mimo_v2_flash.conversion.cli import main as convert
from mimo_v2_flash.tiny_checkpoint import (
    is_fp8_quantized_in_release,
    tiny_config,
    write_fp8_checkpoint,
    write_tiny_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
FP8 = torch.float8_e4m3fn
FP8_ROUNDING = 2.0**-4  # e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 of the value
IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8, 120, 64, 33, 2]])
KV_SUFFIXES = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")


# --------------------------------------------------------------------------------------------------------------
# Independent helpers: blocks, dequantization, the serving loader model, output parsing.


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``convert_checkpoints.py ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert(args)
    return code, out.getvalue(), err.getvalue()


def kv_heads_and_dims(config: dict, name: str) -> tuple[int, int, int]:
    """(KV heads, dk, dv) of the attention layer holding ``name``, from config.json and the tensor's rows."""
    layer = int(name.split(".")[2]) if ".mtp." not in name else None
    sliding = layer is None or config["hybrid_layer_pattern"][layer] == 1
    dk = config["swa_head_dim"] if sliding else config["head_dim"]
    dv = config["swa_v_head_dim"] if sliding else config["v_head_dim"]
    kv = config["swa_num_key_value_heads"] if sliding else config["num_key_value_heads"]
    return kv, dk, dv


def kv_owners(kind: str, which: str, heads: int, dk: int, dv: int, bm: int) -> list[tuple[str, int]]:
    """Owners of K or V rows for a layout name (``k:A+v:B`` pairs quantized apart included)."""
    if kind.startswith("k:"):
        k_kind, v_kind = kind[2:].split("+v:")
        kind = k_kind if which == "k" else v_kind
    assert kind in ("grid", "fused_kv", "fused_kv_split") or kind.startswith(("per_rank:", "rank_fused:")), kind
    return fp8_reference.owners(kind, which, heads, dk, dv, bm)


def grid_owners(rows: int, bm: int) -> list[tuple[str, int]]:
    return [("w", row // bm) for row in range(rows)]


def block_amax(tensors: dict[str, torch.Tensor], owners: dict[str, list], bn: int) -> dict[str, torch.Tensor]:
    """Per element: max |value| over its block (every row with the same owner, within its column block)."""
    per_row = {}
    for name, tensor in tensors.items():
        rows, cols = tensor.shape
        padded = torch.zeros(rows, math.ceil(cols / bn) * bn)
        padded[:, :cols] = tensor.float().abs()
        per_row[name] = padded.view(rows, -1, bn).amax(dim=2)
    table: dict = {}
    for name, own in owners.items():
        for row, key in enumerate(own):
            table[key] = torch.maximum(table[key], per_row[name][row]) if key in table else per_row[name][row]
    return {
        name: torch.stack([table[key] for key in own]).repeat_interleave(bn, dim=1)[:, : tensors[name].shape[1]]
        for name, own in owners.items()
    }


def plain_grid_block_amax(fp8: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |fp8| per (bm x bn) grid block, by padding and reshaping (no owner lists)."""
    bm, bn = block
    rows, cols = fp8.shape
    padded = torch.zeros(math.ceil(rows / bm) * bm, math.ceil(cols / bn) * bn)
    padded[:rows, :cols] = fp8.float().abs()
    return padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn).amax(dim=(1, 3))


def assert_every_block_at_fp8_max(amax: torch.Tensor, what: str) -> None:
    assert bool(((amax == fp8_reference.FP8_MAX) | (amax == 0)).all()), f"{what}: a block lacks |fp8| = 448"
    assert bool((amax == fp8_reference.FP8_MAX).any()), what


def kv_names(k_name: str) -> tuple[str, str]:
    return k_name, k_name.replace("k_proj", "v_proj")


def reference_dequantized(state: dict[str, torch.Tensor], config: dict, kv_layout_of) -> dict[str, torch.Tensor]:
    """fp32 dequantization of every FP8 tensor by ``fp8_reference`` (K/V in ``kv_layout_of(k_name)``, the rest
    on the grid), after checking that every block of that layout holds |fp8| = 448."""
    block = tuple(config["quantization_config"]["weight_block_size"])
    result = {}
    for name, tensor in state.items():
        if tensor.dtype != FP8 or name.endswith(KV_SUFFIXES[1]):
            continue
        if name.endswith(KV_SUFFIXES[0]):
            k_name, v_name = kv_names(name)
            kind = kv_layout_of(k_name)
            heads, dk, dv = kv_heads_and_dims(config, k_name)
            owners = {n: kv_owners(kind, w, heads, dk, dv, block[0]) for n, w in ((k_name, "k"), (v_name, "v"))}
            fp8_amax = block_amax({k_name: state[k_name], v_name: state[v_name]}, owners, block[1])
            for n in (k_name, v_name):
                assert_every_block_at_fp8_max(fp8_amax[n], f"{n} ({kind})")
            result[k_name], result[v_name] = fp8_dequantize_kv(state, k_name, heads, block, kind)
        else:
            assert_every_block_at_fp8_max(plain_grid_block_amax(tensor, block), name)
            result[name] = fp8_reference.dequantize_grid(tensor, state[name + "_scale_inv"], block)
    return result


def fp8_dequantize_kv(state, k_name: str, heads: int, block, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    k_name, v_name = kv_names(k_name)
    qk, sk, qv, sv = state[k_name], state[k_name + "_scale_inv"], state[v_name], state[v_name + "_scale_inv"]
    if not kind.startswith("k:"):
        return fp8_reference.dequantize(qk, sk, qv, sv, heads, block, kind)
    k_kind, v_kind = kind[2:].split("+v:")
    return (
        fp8_reference.dequantize(qk, sk, qv, sv, heads, block, k_kind)[0],
        fp8_reference.dequantize(qk, sk, qv, sv, heads, block, v_kind)[1],
    )


def assert_within_fp8_rounding(
    dequantized: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], config: dict, kv_layout_of, slack=0.0
) -> None:
    """|dequantized - truth| <= 2^-4 x the amax of the element's block (blocks of the tensor's layout)."""
    block = tuple(config["quantization_config"]["weight_block_size"])
    for name, values in dequantized.items():
        if name.endswith(KV_SUFFIXES[1]):
            continue
        if name.endswith(KV_SUFFIXES[0]):
            k_name, v_name = kv_names(name)
            heads, dk, dv = kv_heads_and_dims(config, k_name)
            kind = kv_layout_of(k_name)
            owners = {n: kv_owners(kind, w, heads, dk, dv, block[0]) for n, w in ((k_name, "k"), (v_name, "v"))}
            amax = block_amax({n: truth[n] for n in owners}, owners, block[1])
        else:
            owners = {name: grid_owners(values.shape[0], block[0])}
            amax = block_amax({name: truth[name]}, owners, block[1])
        for n in owners:
            error = (dequantized[n] - truth[n].float()).abs()
            assert bool((error <= (FP8_ROUNDING + slack) * amax[n]).all()), (n, float((error / amax[n]).max()))


def assert_reference_quantization(state, weights, config: dict, kv_layout_of) -> None:
    """Every FP8 tensor (and scale) of ``state`` is what ``fp8_reference`` makes of ``weights``, bit for bit."""
    block = tuple(config["quantization_config"]["weight_block_size"])
    for name, tensor in state.items():
        if tensor.dtype != FP8 or name.endswith(KV_SUFFIXES[1]):
            continue
        if name.endswith(KV_SUFFIXES[0]):
            k_name, v_name = kv_names(name)
            heads = kv_heads_and_dims(config, k_name)[0]
            qk, sk, qv, sv = fp8_reference.quantize(weights[k_name], weights[v_name], heads, block, kv_layout_of(name))
            expected = {k_name: qk, k_name + "_scale_inv": sk, v_name: qv, v_name + "_scale_inv": sv}
        else:
            q, s = fp8_reference.quantize_grid(weights[name].float(), block)
            expected = {name: q, name + "_scale_inv": s}
        for n, value in expected.items():
            bits = (lambda t: t.view(torch.uint8)) if value.dtype == FP8 else (lambda t: t)
            assert state[n].shape == value.shape and torch.equal(bits(state[n]), bits(value)), n


def write_dequantized_hf(fp8_dir: Path, dequantized: dict[str, torch.Tensor], out: Path) -> Path:
    """A BF16 HF directory of an FP8 checkpoint: FP8 tensors replaced by ``dequantized``, scales dropped."""
    out.mkdir()
    state = hf_state_dict(fp8_dir)
    tensors = {
        name: dequantized[name].bfloat16() if tensor.dtype == FP8 else tensor
        for name, tensor in state.items()
        if not name.endswith("_scale_inv")
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16")))
    return out


def megatron_checkpoint_logits(megatron_dir: Path) -> torch.Tensor:
    from mimo_v2_flash.conversion.megatron_checkpoint import load_megatron_checkpoint

    model = load_megatron_checkpoint(megatron_dir, torch.float32)
    with torch.no_grad():
        return model(IDS, torch.arange(IDS.shape[1]).unsqueeze(0), None).float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> float:
    """Max |difference| relative to the largest |logit|; returns it."""
    relative = float((actual - expected).abs().max() / expected.abs().max())
    assert relative < tolerance, relative
    return relative


LOGITS_FP8_TOLERANCE = 0.1  # relative to max |logit|; FP8 weights move these tiny models' logits by 2.5-6 %
# (the bit-exact comparisons with the reference quantizer are the sharp checks; logits guard the whole path)


def served_rank_weights(state, q_name: str, tp: int, kv_heads: int, dk: int, dv: int, block) -> list[torch.Tensor]:
    """The vLLM / SGLang fused QKV loader at attention TP ``tp``, as their source does it, dequantized per rank.

    Rank r holds Q rows [r*Qr, (r+1)*Qr) and KV head group g = r // max(1, tp // kv_heads) (kv_per_rank =
    max(1, kv_heads // tp) heads, K rows [g*Kr, (g+1)*Kr), V likewise). Its scale slots are ceil(rows / bm) rows
    per projection, narrowed from each stored scale at slot index (r for Q, g for K/V) -- narrow raises past the
    end, as the server does -- and the fused weight's row i uses fused scale row i // bm, column block j // bn.
    """
    bm, bn = block
    names = {p: q_name.replace("q_proj", f"{p}_proj") for p in "qkv"}
    weights = {p: state[n] for p, n in names.items()}
    scales = {p: state[n + "_scale_inv"] for p, n in names.items()}
    q_rank = weights["q"].shape[0] // tp
    kv_per_rank = max(1, kv_heads // tp)
    k_rank, v_rank = kv_per_rank * dk, kv_per_rank * dv
    nq, nk, nv = math.ceil(q_rank / bm), math.ceil(k_rank / bm), math.ceil(v_rank / bm)
    ranks = []
    for rank in range(tp):
        group = rank // max(1, tp // kv_heads)
        fused_scale = torch.cat(
            [
                scales["q"].narrow(0, rank * nq, nq),
                scales["k"].narrow(0, group * nk, nk),
                scales["v"].narrow(0, group * nv, nv),
            ]
        )
        fused = torch.cat(
            [
                weights["q"][rank * q_rank : (rank + 1) * q_rank],
                weights["k"][group * k_rank : (group + 1) * k_rank],
                weights["v"][group * v_rank : (group + 1) * v_rank],
            ]
        )
        rows, cols = fused.shape
        per_element = fused_scale[torch.arange(rows) // bm].repeat_interleave(bn, dim=1)[:, :cols]
        ranks.append(fused.float() * per_element)
    return ranks


def exact_rank_weights(exact: dict[str, torch.Tensor], q_name: str, tp: int, kv_heads: int) -> list[torch.Tensor]:
    """The same per-rank rows from an exact dequantization."""
    q, k, v = (exact[q_name.replace("q_proj", f"{p}_proj")] for p in "qkv")
    q_rank, kv_per_rank = q.shape[0] // tp, max(1, kv_heads // tp)
    k_rank, v_rank = k.shape[0] // kv_heads * kv_per_rank, v.shape[0] // kv_heads * kv_per_rank
    result = []
    for rank in range(tp):
        group = rank // max(1, tp // kv_heads)
        result.append(
            torch.cat(
                [
                    q[rank * q_rank : (rank + 1) * q_rank],
                    k[group * k_rank : (group + 1) * k_rank],
                    v[group * v_rank : (group + 1) * v_rank],
                ]
            )
        )
    return result


def serving_verdict(state, exact, config, q_name: str, tp: int) -> str:
    """'exact', 'misread' (the loader reads other scales, silently) or 'fails' (a scale slot past the end)."""
    kv_heads, dk, dv = kv_heads_and_dims(config, q_name)
    block = tuple(config["quantization_config"]["weight_block_size"])
    try:
        served = served_rank_weights(state, q_name, tp, kv_heads, dk, dv, block)
    except RuntimeError:
        return "fails"
    expected = exact_rank_weights(exact, q_name, tp, kv_heads)
    return "exact" if all(torch.equal(s, e) for s, e in zip(served, expected, strict=True)) else "misread"


def attention_kind(name: str, config: dict) -> str:
    if ".mtp." in name:
        return "mtp.self_attn"
    return ("full", "swa")[config["hybrid_layer_pattern"][int(name.split(".")[2])]] + ".self_attn"


def inspect_layouts(hf_dir: Path) -> dict[str, dict[str, int]]:
    """``inspect-fp8``'s ``kind: N tensors, layout {...}`` per tensor kind."""
    code, out, _ = run_cli(["inspect-fp8", "--hf-model", str(hf_dir)])
    assert code == 0
    found = {}
    for line in out.splitlines():
        match = re.match(r"^(\S+): \d+ tensors, layout (\{[^}]*\});", line)
        if match:
            found[match.group(1)] = ast.literal_eval(match.group(2))
    assert found, out
    return found


def inspect_serving(hf_dir: Path) -> dict[str, dict[int, str]]:
    """``inspect-fp8``'s serving lines: per attention kind, the verdict at each TP."""
    code, out, _ = run_cli(["inspect-fp8", "--hf-model", str(hf_dir)])
    assert code == 0
    found: dict[str, dict[int, str]] = {}
    for line in out.splitlines():
        match = re.match(r"^serving (\S+) \(vLLM / SGLang q/k/v scale rule\): (.*)$", line)
        if match:
            for part in match.group(2).split("; "):
                verdict, tps = re.match(r"^(exact|misread|fails) at TP (\[.*\])$", part).groups()
                found.setdefault(match.group(1), {}).update({tp: verdict for tp in ast.literal_eval(tps)})
    return found


# --------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny model with the real head dims, quantized by the reference in each layout; imports and
# exports made once per module.


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Q/K 192, V 128, 8 heads (whole 128-row Q blocks per rank up to TP 4), full layers 2 KV heads, SWA 4, MTP.

    Weights at the usual 0.02 scale: at the tiny maker's 0.1 the random model is so sensitive that FP8 rounding
    alone moves its logits by ~30 %."""
    cfg = tiny_config(
        hidden_size=128,
        head_dim=192,
        v_head_dim=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        swa_num_key_value_heads=4,
        initializer_range=0.02,
    )
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "hf", cfg, mtp_layers=1, seed=21)


@pytest.fixture(scope="module")
def released(base, tmp_path_factory):
    """``released(layout)``: (FP8 dir made by the reference quantizer, its reference dequantization)."""
    cache: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def make(layout: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if layout not in cache:
            directory = tmp_path_factory.mktemp("src_" + layout.replace(":", "_")) / "hf"
            cache[layout] = directory, write_released_format(base, directory, layout)
        return cache[layout]

    return make


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory, parallel_state):
    """``imported(layout, dtype)``: the Megatron checkpoint of ``released(layout)`` imported at ``dtype``."""
    cache: dict[tuple[str, str], Path] = {}

    def make(layout: str, dtype: str = "bfloat16") -> Path:
        if (layout, dtype) not in cache:
            megatron = tmp_path_factory.mktemp(f"megatron_{layout.replace(':', '_')}_{dtype}") / "megatron"
            code, _, err = run_cli(
                ["import", "--hf-model", str(released(layout)[0]), "--megatron-path", str(megatron), "--dtype", dtype]
            )
            assert code == 0, err
            cache[(layout, dtype)] = megatron
        return cache[(layout, dtype)]

    return make


@pytest.fixture(scope="module")
def exported(released, imported, tmp_path_factory):
    """``exported(layout, dtype, *flags)``: (export --dtype fp8 of ``imported(layout, dtype)``, its stdout)."""
    cache: dict[tuple, tuple[Path, str]] = {}

    def make(layout: str, dtype: str = "bfloat16", *flags: str) -> tuple[Path, str]:
        key = (layout, dtype, *flags)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / "hf"
            args = ["export", "--hf-model", str(released(layout)[0]), "--megatron-path", str(imported(layout, dtype))]
            code, stdout, err = run_cli([*args, "--hf-path", str(out), "--dtype", "fp8", *flags])
            assert code == 0, err
            cache[key] = out, stdout
        return cache[key]

    return make


# --------------------------------------------------------------------------------------------------------------
# 1. An untouched model comes back in the source's format, FP8 payloads bit for bit.


@pytest.mark.parametrize(
    "layout, dtype",
    [*((layout, "bfloat16") for layout in fp8_reference.LAYOUTS), ("mixed", "bfloat16"), ("mixed", "float32")],
)
def test_untouched_model_exports_the_sources_fp8_bit_for_bit(layout, dtype, released, exported):
    source, _ = released(layout)
    export, stdout = exported(layout, dtype)
    assert "FP8 in the source's format" in stdout and "FP8 scale layouts:" in stdout, stdout
    original, written = hf_state_dict(source), hf_state_dict(export)
    assert sorted(written) == sorted(original)
    fp8_names = [name for name, tensor in original.items() if tensor.dtype == FP8]
    assert any(".mtp." in name for name in fp8_names) and any(name.endswith(KV_SUFFIXES[1]) for name in fp8_names)
    for name, tensor in original.items():
        out = written[name]
        assert out.dtype == tensor.dtype and out.shape == tensor.shape, name
        if tensor.dtype == FP8:
            assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8)), name
        elif name.endswith("_scale_inv") and dtype == "bfloat16":
            # the import rounded the dequantized weights to bf16: the block amax, so the scale, moves by <= 2^-8
            relative = ((out - tensor).abs() / tensor.abs()).max()
            assert relative <= 2.0**-7, (name, float(relative))
        else:
            assert torch.equal(out, tensor), name  # an fp32 import gives back every scale bit for bit
    source_config = json.loads((source / "config.json").read_text())
    export_config = json.loads((export / "config.json").read_text())
    assert export_config["quantization_config"] == source_config["quantization_config"]


# --------------------------------------------------------------------------------------------------------------
# 2. A changed model: re-quantized with amax scaling in the recorded layouts.


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory) -> Path:
    """The tiny FP8 checkpoint as the package's tiny maker writes it (16 x 16 blocks, the release's K/V rule),
    weights at the 0.02 scale (see ``base``)."""
    root = tmp_path_factory.mktemp("tiny_fp8")
    source = write_tiny_checkpoint(root / "hf", tiny_config(initializer_range=0.02), mtp_layers=1, seed=5)
    return write_fp8_checkpoint(source, root / "fp8")


@pytest.fixture(scope="module")
def tiny_import(tiny_fp8, tmp_path_factory, parallel_state) -> Path:
    megatron = tmp_path_factory.mktemp("tiny_import") / "megatron"
    code, _, err = run_cli(["import", "--hf-model", str(tiny_fp8), "--megatron-path", str(megatron)])
    assert code == 0, err
    return megatron


@pytest.fixture(scope="module")
def changed(tiny_fp8, tiny_import, tmp_path_factory) -> Path:
    """The imported model with every parameter perturbed (what a fine-tune does), saved as a Megatron checkpoint,
    with the import's FP8 layout record next to it as a fine-tuning output keeps it."""
    from mimo_v2_flash.conversion.megatron_checkpoint import load_megatron_checkpoint, save_megatron_checkpoint

    model = load_megatron_checkpoint(tiny_import)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
            parameter.mul_(1 + 0.2 * noise)
    output = tmp_path_factory.mktemp("changed") / "run"
    save_megatron_checkpoint(model, output / "pretrained", tokenizer_dir=tiny_fp8)
    shutil.copy(tiny_import / "fp8_layouts.json", output / "pretrained" / "fp8_layouts.json")
    return output / "pretrained"


def export_pair(hf_model: Path, megatron: Path, root: Path, *extra: str) -> tuple[Path, Path, str]:
    """(export --dtype fp8, export --dtype bfloat16, the FP8 export's stdout) of one Megatron checkpoint."""
    fp8_out, bf16_out = root / "fp8", root / "bf16"
    args = ["export", "--hf-model", str(hf_model), "--megatron-path", str(megatron)]
    code, stdout, err = run_cli([*args, "--hf-path", str(fp8_out), "--dtype", "fp8", *extra])
    assert code == 0, err
    extra_bf16 = [arg.replace("adapter_fp8", "adapter_bf16") for arg in extra]
    code, _, err = run_cli([*args, "--hf-path", str(bf16_out), *extra_bf16])
    assert code == 0, err
    return fp8_out, bf16_out, stdout


def test_changed_model_is_requantized_in_the_recorded_layouts(tiny_fp8, tiny_import, changed, tmp_path):
    fp8_out, bf16_out, stdout = export_pair(tiny_fp8, changed, tmp_path)
    assert "FP8 in the source's format" in stdout, stdout
    record = json.loads((tiny_import / "fp8_layouts.json").read_text())["layouts"]
    config = json.loads((fp8_out / "config.json").read_text())
    source_state, state = hf_state_dict(tiny_fp8), hf_state_dict(fp8_out)
    fp8_names = {name for name, tensor in source_state.items() if tensor.dtype == FP8}
    assert {name for name, tensor in state.items() if tensor.dtype == FP8} == fp8_names == set(record)
    assert all(record[name] == "grid" for name in fp8_names if not name.endswith(KV_SUFFIXES))
    # the model did change: (nearly) every FP8 payload differs from the source's
    unchanged = [n for n in fp8_names if torch.equal(state[n].view(torch.uint8), source_state[n].view(torch.uint8))]
    assert not unchanged, unchanged
    # every block of the recorded layout holds |fp8| = 448; dequantized within FP8 rounding of the BF16 export
    kv_layout_of = record.__getitem__
    dequantized = reference_dequantized(state, config, kv_layout_of)
    bf16 = hf_state_dict(bf16_out)
    assert_within_fp8_rounding(dequantized, bf16, config, kv_layout_of)
    # and exactly what the reference quantizer makes of the BF16 export's weights in those layouts
    assert_reference_quantization(state, bf16, config, kv_layout_of)
    for name, tensor in state.items():
        if tensor.dtype != FP8 and not name.endswith("_scale_inv"):
            assert tensor.dtype == source_state[name].dtype and torch.equal(tensor.to(bf16[name].dtype), bf16[name])
    # logits of the dequantized FP8 export agree with the BF16 export's, and the change is larger than FP8 noise
    dequantized_dir = write_dequantized_hf(fp8_out, dequantized, tmp_path / "dequantized")
    bf16_logits = hf_logits(bf16_out, IDS)
    fp8_noise = assert_logits_close(hf_logits(dequantized_dir, IDS), bf16_logits, LOGITS_FP8_TOLERANCE)
    original = hf_logits(write_dequantized_hf(tiny_fp8, source_dequantized(tiny_fp8), tmp_path / "src"), IDS)
    change = float((bf16_logits - original).abs().max() / original.abs().max())
    assert change > max(4 * fp8_noise, LOGITS_FP8_TOLERANCE), (change, fp8_noise)
    # inspect-fp8 finds the source's layouts in the export
    assert inspect_layouts(fp8_out) == inspect_layouts(tiny_fp8)


def source_dequantized(fp8_dir: Path) -> dict[str, torch.Tensor]:
    """Reference dequantization of a checkpoint written by the tiny maker (K/V: the release's rule)."""
    config = json.loads((fp8_dir / "config.json").read_text())

    def release_rule(k_name: str) -> str:
        return f"rank_fused:{math.gcd(config['num_key_value_heads'], kv_heads_and_dims(config, k_name)[0])}"

    return reference_dequantized(hf_state_dict(fp8_dir), config, release_rule)


# --------------------------------------------------------------------------------------------------------------
# 3. A BF16/FP32 source gets the release's format.


def test_unquantized_source_gets_the_release_format(base, tmp_path, parallel_state):
    megatron, export = tmp_path / "megatron", tmp_path / "fp8"
    code, _, err = run_cli(["import", "--hf-model", str(base), "--megatron-path", str(megatron)])
    assert code == 0, err
    code, stdout, err = run_cli(
        [
            "export",
            "--hf-model",
            str(base),
            "--megatron-path",
            str(megatron),
            "--hf-path",
            str(export),
            "--dtype",
            "fp8",
        ]
    )
    assert code == 0, err
    assert "FP8 in the release's format" in stdout, stdout
    source, state = hf_state_dict(base), hf_state_dict(export)
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    fp8_names = {name for name, tensor in state.items() if tensor.dtype == FP8}
    assert fp8_names == {name for name in source if is_fp8_quantized_in_release(name)}
    assert not any("o_proj" in name or "eh_proj" in name or "mlp.gate." in name for name in fp8_names)
    for kind in ("q_proj", "k_proj", "v_proj", "experts.0.down_proj", "mtp.layers.0.mlp.up_proj"):
        assert any(kind in name for name in fp8_names), kind
    assert sorted(state) == sorted([*source, *(name + "_scale_inv" for name in fp8_names)])
    for name, tensor in source.items():
        if name not in fp8_names:
            dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            assert state[name].dtype == dtype and torch.equal(state[name], tensor.to(dtype)), name

    def release_rule(k_name: str) -> str:  # the release's rule, from its description
        return f"rank_fused:{math.gcd(config['num_key_value_heads'], kv_heads_and_dims(config, k_name)[0])}"

    for name in fp8_names:
        if name.endswith(KV_SUFFIXES):
            heads, dk, dv = kv_heads_and_dims(config, name)
            which = "k" if name.endswith(KV_SUFFIXES[0]) else "v"
            rows = fp8_reference.scale_rows(release_rule(name.replace("v_proj", "k_proj")), which, heads, dk, dv, 128)
            assert state[name + "_scale_inv"].shape[0] == rows, name
    dequantized = reference_dequantized(state, config, release_rule)
    assert_within_fp8_rounding(dequantized, source, config, release_rule, slack=2.0**-8)
    # bit for bit what the reference quantizer makes of the imported (bf16) weights in the release's layouts
    assert_reference_quantization(state, {n: t.bfloat16() for n, t in source.items()}, config, release_rule)
    # re-importing the FP8 export gives the original's logits within FP8 tolerance. With one 128-column block
    # per row this tiny model's data alone cannot tell rank_fused:2 from per_rank:2 on some layers; the layout
    # record the export writes next to its shards breaks that tie.
    assert (export / "fp8_layouts.json").is_file()
    reimported = tmp_path / "reimported"
    code, stdout, err = run_cli(["import", "--hf-model", str(export), "--megatron-path", str(reimported)])
    assert code == 0 and "FP8 scale layouts:" in stdout, err
    assert_logits_close(megatron_checkpoint_logits(reimported), hf_logits(base, IDS), LOGITS_FP8_TOLERANCE)


# --------------------------------------------------------------------------------------------------------------
# 4. --fp8-serve-tp: read exactly by a model of vLLM's / SGLang's loader.


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_serve_tp_export_is_read_exactly_by_the_server_rule(tp, base, released, exported):
    export, stdout = exported("fused_kv_split", "bfloat16", "--fp8-serve-tp", str(tp))
    assert f"K/V laid out for TP {tp} serving" in stdout, stdout
    state = hf_state_dict(export)
    config = json.loads((export / "config.json").read_text())
    from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
    from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint

    reader = FP8Checkpoint(HFCheckpoint(export))
    exact = reference_dequantized(state, config, lambda k_name: reader.layout(k_name).kind)
    q_names = [name for name in state if name.endswith("self_attn.q_proj.weight")]
    assert len(q_names) == 5  # four layers and the MTP layer
    for q_name in q_names:
        assert serving_verdict(state, exact, config, q_name, tp) == "exact", q_name
        for p in "qkv":  # the package's own reader agrees with the reference dequantization
            name = q_name.replace("q_proj", f"{p}_proj")
            assert torch.equal(reader.get(name, torch.float32), exact[name]), name
    # the weights are the source's within FP8 rounding, and the model's logits agree
    _, truth = released("fused_kv_split")
    for name, values in exact.items():
        assert (values - truth[name].float()).abs().max() <= 2 * FP8_ROUNDING * truth[name].float().abs().max(), name
    from mimo_testing import megatron_logits

    reference = hf_logits(write_dequantized_hf(released("fused_kv_split")[0], truth, export.parent / "truth"), IDS)
    assert_logits_close(megatron_logits(export, IDS), reference, LOGITS_FP8_TOLERANCE)


def test_source_layout_is_misread_by_the_server_on_four_kv_head_layers(released):
    """fused_kv_split everywhere (the default export keeps it): a TP-1 server silently reads the SWA layers'
    K/V with the wrong scales."""
    source, truth = released("fused_kv_split")
    state, config = hf_state_dict(source), json.loads((source / "config.json").read_text())
    exact = reference_dequantized(state, config, lambda k_name: "fused_kv_split")
    swa = [n for n in state if n.endswith("self_attn.q_proj.weight") and attention_kind(n, config) != "full.self_attn"]
    assert swa and all(kv_heads_and_dims(config, name)[0] == 4 for name in swa)
    for q_name in swa:
        assert serving_verdict(state, exact, config, q_name, 1) == "misread", q_name


@pytest.mark.parametrize("which", ["fused_kv_split", "mixed", "serve_tp_2", "serve_tp_4"])
def test_inspect_reports_the_serving_tps_the_server_rule_reads_exactly(which, released, exported):
    if which.startswith("serve_tp_"):
        directory, _ = exported("fused_kv_split", "bfloat16", "--fp8-serve-tp", which.rsplit("_", 1)[1])
        from mimo_v2_flash.checkpoint.fp8 import FP8Checkpoint
        from mimo_v2_flash.checkpoint.hf_checkpoint import HFCheckpoint

        reader = FP8Checkpoint(HFCheckpoint(directory))

        def layout_of(k_name: str) -> str:
            return reader.layout(k_name).kind
    else:
        directory, _ = released(which)

        def layout_of(k_name: str) -> str:
            return layer_layout(k_name, which)

    state, config = hf_state_dict(directory), json.loads((directory / "config.json").read_text())
    exact = reference_dequantized(state, config, layout_of)
    heads = config["num_attention_heads"]
    expected: dict[str, dict[int, set[str]]] = {}
    for q_name in (n for n in state if n.endswith("self_attn.q_proj.weight")):
        for tp in (t for t in range(1, heads + 1) if heads % t == 0):
            verdict = serving_verdict(state, exact, config, q_name, tp)
            expected.setdefault(attention_kind(q_name, config), {}).setdefault(tp, set()).add(verdict)
    reported = inspect_serving(directory)
    assert sorted(reported) == sorted(expected)
    for kind, by_tp in expected.items():
        assert sorted(reported[kind]) == sorted(by_tp), kind
        for tp, verdicts in by_tp.items():
            if verdicts == {"exact"}:
                assert reported[kind][tp] == "exact", (kind, tp)
            else:
                assert reported[kind][tp] in verdicts - {"exact"}, (kind, tp, verdicts)
    assert any(v == {"exact"} for by_tp in expected.values() for v in by_tp.values()) or which == "fused_kv_split"


# --------------------------------------------------------------------------------------------------------------
# 5. A LoRA run: the merged model in FP8, the adapter alone in bf16.


@pytest.fixture(scope="module")
def lora_run(tiny_fp8, tiny_import, tmp_path_factory) -> Path:
    """LoRA, 2 steps, from the imported tiny FP8 checkpoint (``bash finetune.sh``, as test_finetune runs it)."""
    output = tmp_path_factory.mktemp("lora") / "run"
    command = ["bash", str(REPO / "examples/models/mimo_v2_flash/finetune.sh"), "--megatron-path", str(tiny_import)]
    command += ["--tokenizer", str(tiny_fp8), "--output", str(output), "--peft", "lora", "--train-iters", "2"]
    command += ["--seq-length", "64", "--global-batch-size", "4", "--lr", "1e-2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return output


@pytest.mark.slow
def test_lora_export_fp8_merges_then_quantizes_and_keeps_the_adapter_bf16(tiny_fp8, tiny_import, lora_run, tmp_path):
    adapter_fp8, adapter_bf16 = tmp_path / "adapter_fp8", tmp_path / "adapter_bf16"
    fp8_out, bf16_out, stdout = export_pair(tiny_fp8, lora_run, tmp_path, "--adapter-path", str(adapter_fp8))
    assert "FP8 in the source's format" in stdout, stdout
    record = json.loads((tiny_import / "fp8_layouts.json").read_text())["layouts"]
    config = json.loads((fp8_out / "config.json").read_text())
    source_state, state = hf_state_dict(tiny_fp8), hf_state_dict(fp8_out)
    assert sorted(state) == sorted(source_state)
    assert all(state[n].dtype == t.dtype and state[n].shape == t.shape for n, t in source_state.items())
    dequantized = reference_dequantized(state, config, record.__getitem__)
    assert_within_fp8_rounding(dequantized, hf_state_dict(bf16_out), config, record.__getitem__)
    changed = [
        n for n in dequantized if not torch.equal(state[n].view(torch.uint8), source_state[n].view(torch.uint8))
    ]
    assert any(".experts." in n for n in changed) and any(n.endswith(KV_SUFFIXES[0]) for n in changed)
    adapter = hf_state_dict(adapter_fp8)
    assert adapter and all(tensor.dtype == torch.bfloat16 for tensor in adapter.values())
    reference_adapter = hf_state_dict(adapter_bf16)
    assert sorted(adapter) == sorted(reference_adapter)
    assert all(torch.equal(adapter[n], reference_adapter[n]) for n in adapter)


# --------------------------------------------------------------------------------------------------------------
# 6. Bad input: one line, exit 2, nothing written.


def test_a_record_the_source_data_contradicts_fails_cleanly(released, imported, tmp_path):
    source, _ = released("fused_kv_split")
    megatron = tmp_path / "megatron"
    shutil.copytree(imported("fused_kv_split"), megatron)
    record_path = megatron / "fp8_layouts.json"
    record = json.loads(record_path.read_text())
    k_name = "model.layers.0.self_attn.k_proj.weight"
    assert record["layouts"][k_name] == "fused_kv_split"
    record["layouts"][k_name] = "per_rank:2"
    record_path.write_text(json.dumps(record))
    out = tmp_path / "out"
    args = ["export", "--hf-model", str(source), "--megatron-path", str(megatron), "--hf-path", str(out)]
    code, stdout, err = run_cli([*args, "--dtype", "fp8"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert k_name in err and "per_rank:2" in err and "fused_kv_split" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["megatron"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dtype", "fp8", "--fp8-serve-tp", "3"], "3"),  # 8 heads do not divide into 3 ranks
        (["--dtype", "fp8", "--fp8-serve-tp", "8"], "8"),  # 192 Q rows per rank: not whole 128-row blocks
        (["--fp8-serve-tp", "2"], "--dtype fp8"),
        (["--dtype", "bfloat16", "--fp8-serve-tp", "2"], "--dtype fp8"),
    ],
)
def test_serve_tp_refusals_fail_cleanly(flags, message, released, imported, tmp_path):
    source, _ = released("fused_kv_split")
    out = tmp_path / "out"
    args = ["export", "--hf-model", str(source), "--megatron-path", str(imported("fused_kv_split"))]
    code, _, err = run_cli([*args, "--hf-path", str(out), *flags])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------------
# 7. neuron_export prepare reads the FP8 export as it reads the source.


def test_neuron_prepare_dequantizes_the_export_as_the_source(released, exported, tmp_path):
    """prepare decides the export's layouts as the source's: from an fp32 import (scales come back bit for bit)
    the prepared weights are the source's exactly; from the default bf16 import (scales within 2^-8) they are
    the export's exact dequantization, within one bf16 step of the source's."""
    from neuron_export.cli import main as neuron_export

    def prepare(directory: Path, name: str) -> dict[str, torch.Tensor]:
        with contextlib.redirect_stdout(io.StringIO()):
            assert neuron_export(["prepare", "--hf-path", str(directory), "--output", str(tmp_path / name)]) == 0
        return hf_state_dict(tmp_path / name)

    source, _ = released("mixed")
    from_source = prepare(source, "from_source")
    assert any(name.endswith(KV_SUFFIXES[1]) for name in from_source)
    from_fp32_import = prepare(exported("mixed", "float32")[0], "from_fp32_import")
    assert sorted(from_fp32_import) == sorted(from_source)
    assert all(torch.equal(from_fp32_import[n], from_source[n]) for n in from_source)

    export, _ = exported("mixed", "bfloat16")
    from_export = prepare(export, "from_bf16_import")
    assert sorted(from_export) == sorted(from_source)
    state, config = hf_state_dict(export), json.loads((export / "config.json").read_text())
    exact = reference_dequantized(state, config, lambda k_name: layer_layout(k_name, "mixed"))
    for name, tensor in from_source.items():
        if name in exact:
            assert torch.equal(from_export[name], exact[name].bfloat16()), name
            step = (from_export[name].float() - tensor.float()).abs()
            assert bool((step <= 2.0**-7 * tensor.float().abs()).all()), name
        else:
            assert torch.equal(from_export[name], tensor), name


# --------------------------------------------------------------------------------------------------------------
# rank_fused with a V scale row that repeats K's last block (V fits in fewer blocks than ceil(V_r / bm)).


def test_release_format_with_v_in_ks_last_block_exports(tmp_path, parallel_state):
    """The tiny maker's head dims (K 24, V 16) on 128-row blocks: each full layer's one head is [K; V] in one
    block, so V's stored scale row only repeats K's."""
    source = write_tiny_checkpoint(tmp_path / "hf", tiny_config(initializer_range=0.02), mtp_layers=1, seed=9)
    megatron, export = tmp_path / "megatron", tmp_path / "fp8"
    assert run_cli(["import", "--hf-model", str(source), "--megatron-path", str(megatron)])[0] == 0
    args = ["export", "--hf-model", str(source), "--megatron-path", str(megatron), "--hf-path", str(export)]
    code, _, err = run_cli([*args, "--dtype", "fp8"])
    assert code == 0, err
    state, config = hf_state_dict(export), json.loads((export / "config.json").read_text())

    def release_rule(k_name: str) -> str:
        return f"rank_fused:{math.gcd(config['num_key_value_heads'], kv_heads_and_dims(config, k_name)[0])}"

    original = hf_state_dict(source)
    assert_reference_quantization(state, {n: t.bfloat16() for n, t in original.items()}, config, release_rule)


def test_rank_fused_source_with_v_in_ks_last_block_imports_exactly(tmp_path, parallel_state):
    source = write_tiny_checkpoint(tmp_path / "hf", tiny_config(initializer_range=0.02), mtp_layers=1, seed=9)
    fp8_dir = tmp_path / "fp8"
    expected = write_released_format(source, fp8_dir, "rank_fused:1")
    megatron, export = tmp_path / "megatron", tmp_path / "export"
    code, _, err = run_cli(["import", "--hf-model", str(fp8_dir), "--megatron-path", str(megatron)])
    assert code == 0, err
    args = ["export", "--hf-model", str(fp8_dir), "--megatron-path", str(megatron), "--hf-path", str(export)]
    assert run_cli(args)[0] == 0
    exported_state = hf_state_dict(export)
    assert all(torch.equal(exported_state[n], t) for n, t in expected.items())
