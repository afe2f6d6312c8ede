"""Finding the weights in a Megatron checkpoint directory (a converted checkpoint or a training run)."""

from __future__ import annotations

import re
from pathlib import Path

from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError

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
