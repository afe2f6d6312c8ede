"""Bad input to convert_checkpoints.py: one-line error naming file and tensor, exit 2, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_conversion import convert

from mimo_v2_flash.tiny_checkpoint import write_fp8_checkpoint, write_tiny_checkpoint

LAYER1_Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good_fp8(tmp_path_factory) -> Path:
    base = write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "hf", mtp_layers=1, seed=21)
    return write_fp8_checkpoint(base, tmp_path_factory.mktemp("good") / "hf", block=(16, 16))


def _shard_of(directory: Path, name: str) -> Path:
    return directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]


def _edit_tensors(directory: Path, edit) -> None:
    for shard in directory.glob("*.safetensors"):
        state = load_file(str(shard))
        save_file(edit(dict(state)), str(shard), metadata={"format": "pt"})


def _edit_index(directory: Path, edit) -> None:
    path = directory / "model.safetensors.index.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def truncate(d):
    shard = _shard_of(d, LAYER1_Q)
    shard.write_bytes(shard.read_bytes()[:-100])


def corrupt_header(d):
    shard = _shard_of(d, LAYER1_Q)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))


def missing_shard(d):
    _shard_of(d, LAYER1_Q).unlink()


def drop_scale(d):
    _edit_tensors(d, lambda s: {k: v for k, v in s.items() if k != LAYER1_Q + "_scale_inv"})
    _edit_index(
        d, lambda i: {**i, "weight_map": {k: v for k, v in i["weight_map"].items() if k != LAYER1_Q + "_scale_inv"}}
    )


def drop_weight(d):
    _edit_tensors(d, lambda s: {k: v for k, v in s.items() if k != LAYER1_Q})
    _edit_index(d, lambda i: {**i, "weight_map": {k: v for k, v in i["weight_map"].items() if k != LAYER1_Q}})


def wrong_shape(d):
    name = "model.layers.0.input_layernorm.weight"
    _edit_tensors(d, lambda s: {**s, name: torch.ones(7, dtype=torch.bfloat16)} if name in s else s)


def wrong_dtype(d):
    name = "model.norm.weight"
    _edit_tensors(d, lambda s: {**s, name: torch.ones(64, dtype=torch.int32)} if name in s else s)


def missing_config_field(d):
    config = json.loads((d / "config.json").read_text())
    del config["hidden_size"]
    (d / "config.json").write_text(json.dumps(config))


def dotdot_in_index(d):
    _edit_index(d, lambda i: {**i, "weight_map": {**i["weight_map"], LAYER1_Q: "../" + i["weight_map"][LAYER1_Q]}})


def absolute_in_index(d):
    _edit_index(d, lambda i: {**i, "weight_map": {**i["weight_map"], LAYER1_Q: "/etc/passwd"}})


def pickle_checkpoint(d):
    for item in d.glob("*.safetensors*"):
        item.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def unexpected_tensor(d):
    _edit_tensors(d, lambda s: {**s, "model.layers.0.mystery.weight": torch.ones(2)} if LAYER1_Q in s else s)
    _edit_index(
        d,
        lambda i: {**i, "weight_map": {**i["weight_map"], "model.layers.0.mystery.weight": i["weight_map"][LAYER1_Q]}},
    )


CASES = {
    "truncated shard": (truncate, ["truncated", ".safetensors"]),
    "corrupt header": (corrupt_header, ["corrupt", ".safetensors"]),
    "missing shard": (missing_shard, ["shard named by the index", "is missing", ".safetensors"]),
    "weight without scale": (drop_scale, [LAYER1_Q, "no _scale_inv"]),
    "scale without weight": (drop_weight, [LAYER1_Q + "_scale_inv", "has no weight"]),
    "wrong shape": (wrong_shape, ["model.layers.0.input_layernorm.weight", "shape"]),
    "wrong dtype": (wrong_dtype, ["model.norm.weight", "dtype"]),
    "config missing field": (missing_config_field, ["config.json", "hidden_size"]),
    "dotdot in index": (dotdot_in_index, ["escapes"]),
    "absolute path in index": (absolute_in_index, ["escapes"]),
    "pickle checkpoint": (pickle_checkpoint, ["pytorch_model.bin", "refused"]),
    "unexpected tensor": (unexpected_tensor, ["model.layers.0.mystery.weight"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, good_fp8, tmp_path, capsys, parallel_state):
    damage, expected = CASES[case]
    bad = tmp_path / "bad_hf"
    shutil.copytree(good_fp8, bad)
    damage(bad)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    code = convert(["import", "--hf-model", str(bad), "--megatron-path", str(out_parent / "megatron")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in expected:
        assert fragment in err[0], (fragment, err[0])
    assert "Traceback" not in err[0]
    assert list(out_parent.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(good_fp8, tmp_path, capsys, parallel_state):
    target = tmp_path / "megatron"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    assert convert(["import", "--hf-model", str(good_fp8), "--megatron-path", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["megatron"]


def test_export_of_missing_megatron_checkpoint_is_one_line(good_fp8, tmp_path, capsys, parallel_state):
    code = convert(
        [
            "export",
            "--hf-model",
            str(good_fp8),
            "--megatron-path",
            str(tmp_path / "nope"),
            "--hf-path",
            str(tmp_path / "export"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope" in err[0]
    assert not (tmp_path / "export").exists()
