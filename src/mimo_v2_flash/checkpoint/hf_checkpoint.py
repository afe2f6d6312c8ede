"""Validated, lazy access to a Hugging Face safetensors checkpoint directory.

Everything is checked from the index and the safetensors headers before a weight is read: index entries that
escape the directory (``..``, absolute paths), shards named by the index but missing, truncated shards (a
tensor's byte range beyond the file end), unparsable headers and pickle checkpoints (``*.bin``/``*.pt``, refused
and never unpickled). Each problem raises :class:`CheckpointError` with a one-line message naming the file and,
where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from functools import cached_property
from pathlib import Path, PurePosixPath

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MTP_KEY = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """An expected, user-facing problem with a checkpoint (reported as one line, no traceback)."""


def count_mtp_layers(keys) -> int:
    """Number of MTP layers in a checkpoint (the config does not record it): highest index + 1."""
    indices = {int(match.group(1)) for key in keys if (match := MTP_KEY.match(key))}
    if indices and indices != set(range(max(indices) + 1)):
        raise ValueError(f"MTP layers are not numbered 0..N-1 (found {sorted(indices)})")
    return len(indices)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; returns it and the file offset where tensor data starts.

    Every tensor's byte range must lie inside the file and hold exactly its shape's bytes.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length <= 0 or 8 + length > size:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header length {length})")
            header = json.loads(handle.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors header ({error.__class__.__name__})") from None
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name} lies beyond the end of the file (truncated shard)")
        shape = tuple(info["shape"])
        needed = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if needed != end - start:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes, its shape {shape} needs {needed}")
    return header, 8 + length


def read_index_metadata(directory: str | Path) -> dict:
    """The ``metadata`` of a checkpoint directory's index (e.g. MiMo-V2.6's ``tp_size``), or ``{}`` without one."""
    index = Path(directory) / INDEX_NAME
    if not index.is_file():
        return {}
    try:
        return _index_metadata(json.loads(index.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{index}: not a valid safetensors index ({error.__class__.__name__})") from None


def _index_metadata(parsed: dict) -> dict:
    metadata = parsed.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise TypeError("index metadata is not a mapping")
    return metadata


def _safe_shard_path(directory: Path, shard: str) -> Path:
    pure = PurePosixPath(shard)
    if pure.is_absolute() or ".." in pure.parts or "\\" in shard or not shard:
        raise CheckpointError(f"{directory / INDEX_NAME}: shard path {shard!r} escapes the checkpoint directory")
    return directory / pure


class HFCheckpoint:
    """A safetensors checkpoint directory: config, tensor names, shapes, dtypes and lazy tensor reads."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        self.index_metadata: dict = {}
        self.weight_map = self._weight_map()
        self.headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}
        for shard in sorted(set(self.weight_map.values())):
            self.headers[shard], self._data_start[shard] = read_safetensors_header(self.directory / shard)
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise CheckpointError(f"{self.directory / shard}: tensor {name} listed in the index is missing")

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                parsed = json.loads(index.read_text())
                weight_map = parsed["weight_map"]
                metadata = _index_metadata(parsed)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"{index}: not a valid safetensors index ({error.__class__.__name__})") from None
            self.index_metadata = metadata
            for name, shard in weight_map.items():
                path = _safe_shard_path(self.directory, shard)
                if not path.is_file():
                    raise CheckpointError(f"{path}: shard named by the index (for {name}) is missing")
            return dict(weight_map)
        single = self.directory / SINGLE_NAME
        if single.is_file():
            header, _ = read_safetensors_header(single)
            return {name: SINGLE_NAME for name in header if name != "__metadata__"}
        pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.directory / pickles[0]}: pickle checkpoints are refused (they can execute code when loaded); "
                "convert them to safetensors first"
            )
        raise CheckpointError(f"{self.directory}: no {INDEX_NAME} or {SINGLE_NAME} found")

    @cached_property
    def config(self) -> dict:
        from mimo_v2_flash.config import MiMoV2FlashConfigError, load_config_dict

        try:
            return load_config_dict(self.directory)
        except MiMoV2FlashConfigError as error:
            raise CheckpointError(str(error)) from None

    def keys(self) -> list[str]:
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        return self.directory / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.headers[self.weight_map[name]][name]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self.headers[self.weight_map[name]][name]["data_offsets"]
        return end - start

    def shard_sizes(self) -> dict[str, int]:
        return {shard: (self.directory / shard).stat().st_size for shard in self.headers}

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (only its bytes) into fresh memory, or into the front of a uint8 ``buffer`` if given.

        Plain reads, not a memory map: pages of a mapped shard stay in this process's resident set until the map
        is closed, so streaming a shard through a map holds up to the whole shard; a read tensor is freed with
        the tensor.
        """
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name} not found in the checkpoint")
        shard = self.weight_map[name]
        path = self.directory / shard
        info = self.headers[shard][name]
        start, end = info["data_offsets"]
        if buffer is None or buffer.numel() < end - start:
            buffer = torch.empty(end - start, dtype=torch.uint8)
        buffer = buffer[: end - start]
        try:
            with path.open("rb", buffering=0) as handle:
                handle.seek(self._data_start[shard] + start)
                read = handle.readinto(memoryview(buffer.numpy()))
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({error})") from None
        if read != end - start:
            raise CheckpointError(f"{path}: tensor {name} is truncated")
        return buffer.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
