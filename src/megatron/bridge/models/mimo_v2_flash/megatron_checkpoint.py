"""Megatron distributed checkpoints of MiMo-V2-Flash: atomic save, load (any layout), latest-iteration lookup.

Saving and loading go through Megatron-Bridge's own ``training.model_load_save`` (torch_dist format with
``run_config.yaml``), so fine-tuning loads what ``convert_checkpoints.py import`` writes and vice versa.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.bridge.models.mimo_v2_flash.cpu_adaptations import cuda_absent
from megatron.bridge.models.mimo_v2_flash.hf_checkpoint import CheckpointError
from megatron.bridge.models.mimo_v2_flash.output_dirs import replace_directory, staging_dir

ITER_DIR = re.compile(r"^iter_(\d+)$")


def latest_iteration_dir(path: str | Path) -> Path:
    """The directory holding model weights: ``path`` itself, or its latest ``iter_*`` (training outputs)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: Megatron checkpoint directory not found")
    if (path / "metadata.json").is_file():
        return path
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        candidate = path / f"iter_{int(text):07d}" if text.isdigit() else None
        if candidate is not None and candidate.is_dir():
            return candidate
    iterations = sorted((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := ITER_DIR.match(p.name)))
    if not iterations:
        raise CheckpointError(f"{path}: not a Megatron checkpoint (no metadata.json and no iter_* directories)")
    return iterations[-1][1]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_megatron_checkpoint(model: torch.nn.Module, path: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Save atomically (replacing ``path`` if it exists): all ranks write a hidden sibling, rank 0 renames it."""
    from megatron.bridge.training.model_load_save import save_megatron_model

    path = Path(path)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    staging = staging_dir(path) if rank0 else path.parent / f".{path.name}.partial"
    _barrier()
    has_tokenizer = tokenizer_dir is not None and any(Path(tokenizer_dir).glob("tokenizer*"))
    save_megatron_model([model], str(staging), hf_tokenizer_path=str(tokenizer_dir) if has_tokenizer else None)
    _barrier()
    if rank0:
        replace_directory(staging, path)
    _barrier()
    return path


def load_megatron_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None
) -> torch.nn.Module:
    """Load the latest weights under ``path`` at the given parallel layout; optionally cast to ``dtype``."""
    from megatron.bridge.training.model_load_save import load_megatron_model

    directory = latest_iteration_dir(path)
    overrides = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp if etp is not None else tp,
    }
    models = load_megatron_model(
        str(directory), use_cpu_init=cuda_absent(), skip_temp_dist_context=dist.is_initialized(), mp_overrides=overrides
    )
    model = models[0] if isinstance(models, list) else models
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model
