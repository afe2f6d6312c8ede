"""Stream Megatron weights into Hugging Face safetensors shards in the MiMo-V2-Flash hub layout.

Tensors arrive one at a time and are written straight into bounded-size shards, so memory holds the tensor being
written, not a shard. Output goes to a temporary sibling directory renamed at the end: a failure leaves
nothing behind. ``e_score_correction_bias`` stays fp32 (as in the release); everything else is cast to the
requested dtype.
"""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mimo_v2_flash.checkpoint.fp8 import LAYOUT_RECORD
from mimo_v2_flash.checkpoint.hf_checkpoint import INDEX_NAME, SAFETENSORS_DTYPES, CheckpointError
from mimo_v2_flash.checkpoint.output_dirs import replace_directory, staging_dir
from mimo_v2_flash.config import FUSED_PROJECTIONS, SPLIT_PROJECTIONS, projection_layout, with_native_fields

KEEP_FP32 = ("e_score_correction_bias",)
READ_AHEAD_BYTES = 64 * 1024**2
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def export_config(original: dict, dtype: torch.dtype, source_format: bool = False) -> dict:
    """The original config without ``quantization_config``, with every architecture field in hub spelling, the
    transformers-native fields and ``torch_dtype``.

    A MiMo-V2 family config (fused ``qkv_proj``; transformers has no model for it) stays the family's own, towers
    included: unchanged for an export in the source's format (``source_format``), else with separate q/k/v
    (``attention_projection_layout: "split"``, what vLLM and the family's own code read) and ``torch_dtype``.
    """
    hub_form = {k: v for k, v in original.items() if k not in ("quantization_config", "dtype")}
    if projection_layout(original) == FUSED_PROJECTIONS:
        if source_format:
            return hub_form
        return dict(hub_form, attention_projection_layout=SPLIT_PROJECTIONS, torch_dtype=DTYPE_NAMES[dtype])
    return dict(with_native_fields(hub_form), torch_dtype=DTYPE_NAMES[dtype])


SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class ShardWriter:
    """Writes tensors straight into ``model-XXXXX-of-YYYYY.safetensors`` shards of bounded size.

    Nothing is buffered: each tensor's bytes go to the open shard as it arrives. A safetensors header precedes
    the data but is only known once the shard is complete, so ``header_reserve`` bytes are kept free in front
    of the data and the header is written there at the end, padded with spaces (the format allows trailing
    whitespace in the header). A shard also closes when its header would outgrow the reserve.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, header_reserve: int = 256 * 1024) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.header_reserve = header_reserve
        self.shards: list[list[str]] = []
        self.names: set[str] = set()
        self.total_bytes = 0
        self._file = None
        self._entries: dict[str, dict] = {}
        self._data_bytes = 0
        self._header_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise CheckpointError(f"export produced tensor {name} twice")
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        entry_bytes = len(json.dumps({name: dict(entry, data_offsets=[10**15, 10**15])})) + 1
        if self._file is not None and (
            self._data_bytes + size > self.max_shard_bytes or self._header_bytes + entry_bytes > self.header_reserve
        ):
            self._close_shard()
        if self._file is None:
            self._file = (self.directory / f"shard-{len(self.shards):05d}.tmp").open("wb")
            self._file.seek(8 + self.header_reserve)
            self._entries, self._data_bytes, self._header_bytes = {}, 0, 64
        if tensor.numel():
            self._file.write(tensor.reshape(-1).view(torch.uint8).numpy())
        self._entries[name] = dict(entry, data_offsets=[self._data_bytes, self._data_bytes + size])
        self._data_bytes += size
        self._header_bytes += entry_bytes
        self.names.add(name)
        self.total_bytes += size

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.header_reserve:
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the reserve")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_reserve) + header.ljust(self.header_reserve, b" "))
        self._file.close()
        self._file = None
        self.shards.append(sorted(self._entries))

    def finish(self) -> dict[str, str]:
        """Name the shards ``-of-N`` now that N is known and write the index; returns the weight map."""
        if self._file is not None:
            self._close_shard()
        count = len(self.shards)
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{index:05d}.tmp").rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index_doc, indent=2) + "\n")
        return weight_map


def copy_artifacts(source: Path, target: Path) -> list[str]:
    """Copy tokenizer files, remote code and other non-weight files (config.json is written separately)."""
    copied = []
    for item in sorted(source.iterdir()):
        if item.name in ("config.json", INDEX_NAME, LAYOUT_RECORD) or item.name.endswith(WEIGHT_FILES):
            continue
        if item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, target / item.name)
            copied.append(item.name)
    return copied


def read_ahead(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``items``, produced by a worker thread while the caller consumes the ones before.

    The worker stays at most ``max_bytes`` of tensors ahead (always at least one tensor), so reading and mapping
    the next weights overlaps writing the current one at a bounded cost in memory. An exception in the worker is
    raised here; if the caller stops early, the worker stops after its current item.
    """
    ready: deque = deque()
    state = {"bytes": 0, "done": False, "error": None, "stop": False}
    changed = threading.Condition()

    def produce() -> None:
        try:
            for name, tensor in items:
                size = tensor.numel() * tensor.element_size()

                def room(size: int = size) -> bool:
                    return state["stop"] or not ready or state["bytes"] + size <= max_bytes

                with changed:
                    changed.wait_for(room)
                    if state["stop"]:
                        return
                    ready.append((name, tensor, size))
                    state["bytes"] += size
                    changed.notify_all()
        except BaseException as error:  # handed to the consumer, which raises it
            state["error"] = error
        finally:
            with changed:
                state["done"] = True
                changed.notify_all()

    worker = threading.Thread(target=produce, name="export-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            with changed:
                changed.wait_for(lambda: ready or state["done"])
                if not ready:
                    break
                name, tensor, size = ready.popleft()
                state["bytes"] -= size
                changed.notify_all()
            yield name, tensor
            del tensor
        if state["error"] is not None:
            raise state["error"]
    finally:
        with changed:
            state["stop"] = True
            ready.clear()
            changed.notify_all()
        worker.join()


def write_hf_checkpoint(
    weights: Iterable[tuple[str, torch.Tensor]],
    original_dir: Path,
    output_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 1024**3,
    progress=None,
    quantizer=None,
    passthrough: Iterable[tuple[str, torch.Tensor]] = (),
) -> dict:
    """Write streamed ``(hub name, tensor)`` pairs as an HF checkpoint; atomic. Returns a summary dict.

    ``quantizer``: an :class:`~mimo_v2_flash.checkpoint.fp8_export.FP8ExportPlan`; it decides every tensor's dtype
    (FP8 weights with their scales, the rest as in the source) and its ``quantization_config`` goes to config.json.
    Without it, every tensor is cast to ``dtype`` (``e_score_correction_bias`` stays fp32). ``passthrough``
    tensors (MiMo-V2.5's towers) follow the weights, written as given, byte for byte.
    """
    original_config = json.loads((original_dir / "config.json").read_text())
    staging = staging_dir(output_dir)
    staging.mkdir()
    start = time.perf_counter()
    if quantizer is not None:
        # Three stages in three threads: reading, quantizing (in the outer read-ahead's worker) and writing, each
        # at most READ_AHEAD_BYTES (or one tensor) ahead of the next. Quantizing in the reader's thread instead
        # left the writer idle ~60% of the time (docs/fp8_export.md).
        weights = quantizer.quantize(read_ahead(weights, READ_AHEAD_BYTES))
    try:
        writer = ShardWriter(staging, max_shard_bytes)
        for name, tensor in read_ahead(weights, READ_AHEAD_BYTES):
            target = tensor.dtype if quantizer is not None else torch.float32 if name.endswith(KEEP_FP32) else dtype
            writer.add(name, tensor.detach().to("cpu", target))
            if progress is not None:
                progress(name, tensor.numel() * target.itemsize)
        for name, tensor in passthrough:
            writer.add(name, tensor)
        weight_map = writer.finish()
        config = export_config(original_config, dtype, source_format=quantizer is not None)
        if quantizer is not None:
            config["quantization_config"] = quantizer.quantization_config
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = copy_artifacts(original_dir, staging)
        if quantizer is not None:
            (staging / LAYOUT_RECORD).write_text(json.dumps(quantizer.record(), indent=1) + "\n")
        for written in staging.iterdir():
            written.chmod(0o644)
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "tensors": len(writer.names),
        "bytes": writer.total_bytes,
        "shards": len(set(weight_map.values())),
        "seconds": time.perf_counter() - start,
        "copied": copied,
    }
