"""SHA-256 manifest of an output directory, in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` verifies it)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from neuron_export.errors import ExportError

MANIFEST_NAME = "SHA256SUMS"
CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def listed_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` except the manifest itself, in a stable order."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_NAME
    )


def write_manifest(directory: Path, progress: Callable[[int], None] | None = None) -> Path:
    """Hash every file under ``directory`` and write ``SHA256SUMS`` (relative POSIX paths)."""
    lines = [f"{sha256_file(p, progress)}  {p.relative_to(directory).as_posix()}\n" for p in listed_files(directory)]
    target = directory / MANIFEST_NAME
    target.write_text("".join(lines))
    return target


def read_manifest(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` from ``SHA256SUMS``."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path}: missing (not a 'neuron_export prepare' output?)")
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ExportError(f"{path}:{number}: malformed line")
        entries[name] = digest
    return entries


def verify_manifest(directory: Path, hashes: bool = False) -> None:
    """Check that the files listed in ``SHA256SUMS`` exist and nothing unlisted was added; with ``hashes`` also
    recompute every digest (reads all the data)."""
    entries = read_manifest(directory)
    present = {p.relative_to(directory).as_posix() for p in listed_files(directory)}
    missing = sorted(set(entries) - present)
    if missing:
        raise ExportError(f"{directory / missing[0]}: listed in {MANIFEST_NAME} but missing")
    extra = sorted(present - set(entries))
    if extra:
        raise ExportError(f"{directory / extra[0]}: not listed in {MANIFEST_NAME} (modified after prepare?)")
    if hashes:
        for name, digest in entries.items():
            if sha256_file(directory / name) != digest:
                raise ExportError(f"{directory / name}: SHA-256 differs from {MANIFEST_NAME}")
