"""Atomic output directories: write into a hidden sibling, then rename; never leave a partial result."""

from __future__ import annotations

import shutil
from pathlib import Path

from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` (then the old one is replaced only on success)."""
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: output already exists (pass --overwrite to replace it)")


def staging_dir(final: Path) -> Path:
    """The hidden sibling a run writes into (removed first if a previous run died)."""
    staged = final.parent / f".{final.name}.partial"
    if staged.exists():
        shutil.rmtree(staged)
    final.parent.mkdir(parents=True, exist_ok=True)
    return staged


def replace_directory(staged: Path, final: Path) -> None:
    """Move ``staged`` to ``final``; an existing ``final`` is swapped out and deleted afterwards."""
    if final.exists():
        backup = final.parent / f".{final.name}.old"
        if backup.exists():
            shutil.rmtree(backup)
        final.rename(backup)
        staged.rename(final)
        shutil.rmtree(backup)
    else:
        staged.rename(final)
