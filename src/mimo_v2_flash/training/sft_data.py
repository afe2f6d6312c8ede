"""Supervised fine-tuning data for MiMo-V2-Flash: one JSONL file, checked and staged for Megatron-Bridge's loader.

Two record formats are accepted, decided by the first record and then required of every record:

* chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``, rendered
  with the tokenizer's chat template; the loss covers the assistant turns.
* prompt/completion: ``{"input": ..., "output": ...}``; the loss covers the output.

Megatron-Bridge's ``GPTSFTDatasetConfig`` reads ``<dataset_root>/training.jsonl``; the user's file is linked
there, so the index files the loader builds land in the run's directory, not next to the user's data.

The checks use only the standard library, so ``finetune.sh`` can run them before starting torchrun without
importing the framework.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_ROLES = {"system", "user", "assistant", "tool"}


class SFTDataError(ValueError):
    """A data file that cannot be trained on (the message names the file and line)."""


def _record_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                raise SFTDataError(f"{where}: each message needs a role out of {sorted(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str):
                raise SFTDataError(f"{where}: each message needs a string 'content'")
        if not any(message["role"] == "assistant" for message in messages):
            raise SFTDataError(f"{where}: no assistant message to train on")
        return "chat"
    if isinstance(record.get("input"), str) and isinstance(record.get("output"), str):
        return "prompt_completion"
    raise SFTDataError(f"{where}: expected 'messages' (chat) or string 'input' and 'output' fields")


def inspect_sft_file(path: str | Path) -> tuple[str, int]:
    """Check every record of a JSONL file; returns its format ("chat" or "prompt_completion") and record count.

    Raises:
        SFTDataError: naming the file and line of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: data file not found")
    kind, count = None, 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SFTDataError(f"{where}: not valid JSON ({error.msg})") from None
            record_kind = _record_format(record, where)
            if kind is None:
                kind = record_kind
            elif record_kind != kind:
                raise SFTDataError(f"{where}: {record_kind} record in a {kind} file (one format per file)")
            count += 1
    if not count:
        raise SFTDataError(f"{path}: no records")
    return kind, count


def stage_sft_data(data_file: str | Path, dataset_root: str | Path) -> tuple[Path, str]:
    """Link ``data_file`` as ``dataset_root/training.jsonl`` after checking it; returns (root, format)."""
    data_file = Path(data_file).resolve()
    kind, _ = inspect_sft_file(data_file)
    root = Path(dataset_root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / "training.jsonl"
    if target.is_symlink() or target.exists():
        if target.resolve() == data_file:
            return root, kind
        shutil.rmtree(root)  # the link and the index files built for another data file
        root.mkdir(parents=True)
    target.symlink_to(data_file)
    return root, kind
