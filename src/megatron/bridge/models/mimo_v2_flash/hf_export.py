"""Stream Megatron weights into Hugging Face safetensors shards in the MiMo-V2-Flash hub layout.

Tensors arrive one at a time from the bridge (``export_hf_weights``) and are written shard by shard, so memory
holds one shard at most. Output goes to a temporary sibling directory renamed at the end: a failure leaves
nothing behind. ``e_score_correction_bias`` stays fp32 (as in the release); everything else is cast to the
requested dtype.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron.bridge.models.mimo_v2_flash.hf_checkpoint import INDEX_NAME, CheckpointError
from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_config import parse_architecture, with_native_fields
from megatron.bridge.models.mimo_v2_flash.output_dirs import replace_directory, staging_dir

KEEP_FP32 = ("e_score_correction_bias",)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def export_config(original: dict, dtype: torch.dtype) -> dict:
    """The original config without ``quantization_config``, with ``torch_dtype`` and the native fields added."""
    config = {k: v for k, v in original.items() if k != "quantization_config"}
    arch = parse_architecture(config)
    hub_form = dict(
        config,
        hybrid_layer_pattern=[int(t == "sliding_attention") for t in arch.layer_types],
        moe_layer_freq=[int(v) for v in arch.moe_layers],
        sliding_window_size=arch.sliding_window_size,
        rope_theta=arch.full_rope_theta,
        swa_rope_theta=arch.swa_rope_theta,
        partial_rotary_factor=arch.partial_rotary_factor,
        layernorm_epsilon=arch.norm_eps,
        swa_num_key_value_heads=arch.swa_num_kv_heads,
    )
    hub_form.pop("dtype", None)
    return dict(with_native_fields(hub_form), torch_dtype=DTYPE_NAMES[dtype])


class ShardWriter:
    """Accumulates tensors and writes ``model-XXXXX-of-YYYYY.safetensors`` shards of bounded size."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in shard for shard in self.shards):
            raise CheckpointError(f"export produced tensor {name} twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        index = len(self.shards)
        save_file(self.pending, str(self.directory / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Name the shards ``-of-N`` now that N is known and write the index; returns the weight map."""
        self.flush()
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
        if item.name in ("config.json", INDEX_NAME) or item.name.endswith(WEIGHT_FILES) or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, target / item.name)
            copied.append(item.name)
    return copied


def write_hf_checkpoint(
    weights: Iterable[tuple[str, torch.Tensor]],
    original_dir: Path,
    output_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 1024**3,
    progress=None,
) -> dict:
    """Write streamed ``(hub name, tensor)`` pairs as an HF checkpoint; atomic. Returns a summary dict."""
    original_config = json.loads((original_dir / "config.json").read_text())
    staging = staging_dir(output_dir)
    staging.mkdir()
    start = time.perf_counter()
    try:
        writer = ShardWriter(staging, max_shard_bytes)
        count = 0
        for name, tensor in weights:
            target = torch.float32 if name.endswith(KEEP_FP32) else dtype
            writer.add(name, tensor.detach().to("cpu", target))
            count += 1
            if progress is not None:
                progress(name, tensor.numel() * torch.empty((), dtype=target).element_size())
        weight_map = writer.finish()
        config = export_config(original_config, dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = copy_artifacts(original_dir, staging)
        for written in staging.iterdir():
            written.chmod(0o644)
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "tensors": count,
        "bytes": writer.total_bytes,
        "shards": len(set(weight_map.values())),
        "seconds": time.perf_counter() - start,
        "copied": copied,
    }
