"""SFT data files: format detection, one-line errors naming file and line, staging for Megatron-Bridge's loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mimo_v2_flash.training.sft_data import SFTDataError, inspect_sft_file, stage_sft_data

REPO = Path(__file__).resolve().parents[4]
SHIPPED = REPO / "examples/models/mimo_v2_flash/data/tiny_sft.jsonl"
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_shipped_dataset_is_a_few_hundred_chat_records():
    kind, count = inspect_sft_file(SHIPPED)
    assert kind == "chat" and 200 <= count <= 1000


def test_formats(tmp_path):
    assert inspect_sft_file(write(tmp_path / "c.jsonl", CHAT, "", CHAT)) == ("chat", 2)
    pairs = write(tmp_path / "p.jsonl", {"input": "2+2?", "output": "4"})
    assert inspect_sft_file(pairs) == ("prompt_completion", 1)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{not json"], ":1: not valid JSON"),
        ([CHAT, {"input": "a", "output": "b"}], ":2: prompt_completion record in a chat file"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: no assistant message"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], ":1: each message needs a role"),
        ([{"messages": [{"role": "user", "content": 3}]}], ":1: each message needs a string 'content'"),
        ([{"prompt": "a"}], ":1: expected 'messages' (chat) or string 'input' and 'output'"),
        ([[1, 2]], ":1: a record must be a JSON object"),
        ([""], ": no records"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(SFTDataError) as error:
        inspect_sft_file(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(SFTDataError, match="data file not found"):
        inspect_sft_file(tmp_path / "absent.jsonl")


def test_staging_links_the_file_and_forgets_indexes_of_another(tmp_path):
    first, second = write(tmp_path / "a.jsonl", CHAT), write(tmp_path / "b.jsonl", {"input": "x", "output": "y"})
    root, kind = stage_sft_data(first, tmp_path / "data")
    assert kind == "chat" and (root / "training.jsonl").resolve() == first.resolve()
    (root / "training.jsonl.idx.npy").write_bytes(b"index of a")  # what Megatron-Bridge's loader builds
    assert stage_sft_data(first, tmp_path / "data") == (root, "chat")
    assert (root / "training.jsonl.idx.npy").exists()  # same file: its index is kept
    root, kind = stage_sft_data(second, tmp_path / "data")
    assert kind == "prompt_completion" and (root / "training.jsonl").resolve() == second.resolve()
    assert not (root / "training.jsonl.idx.npy").exists()


def test_rank0_work_returns_its_value_and_reraises_its_own_error_type(parallel_state):
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.runtime.process_groups import run_on_rank0

    assert run_on_rank0(lambda: {"rows": 3}) == {"rows": 3}

    def bad_data():
        raise SFTDataError("train.jsonl: line 2 is not JSON")

    def bad_checkpoint():
        raise CheckpointError("model.safetensors: truncated")

    with pytest.raises(SFTDataError, match="line 2 is not JSON"):
        run_on_rank0(bad_data)
    with pytest.raises(CheckpointError, match="truncated"):
        run_on_rank0(bad_checkpoint)
