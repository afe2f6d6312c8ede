"""``compile``: check a prepared checkpoint and a layout, then compile with NxDI or write a bundle for trn2.

1. the prepared checkpoint must pass ``inspect`` in the NxDI layout and match its ``SHA256SUMS``;
2. the layout must pass ``plan``;
3. the compiled path gets the ready-to-run bundle (``bundle.py``), staged in a hidden sibling;
4. with the real Neuron SDK (found by importing it in a subprocess of ``neuron_python``), the backend script runs
   the adapter's compile, load and a smoke generation into the staged directory, which then replaces the compiled
   path; without it the bundle alone is put in place and an :class:`ExportError` says how to run it on trn2.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mimo_v2_flash.checkpoint import output_dirs
from neuron_export import bundle
from neuron_export.errors import ExportError
from neuron_export.inspection import PREPARED, inspect_checkpoint
from neuron_export.layout import Layout
from neuron_export.manifest import verify_manifest
from neuron_export.neuron_sdk import ADAPTER_ENV, ADAPTER_MODULE, adapter_dir, detect_sdk, run_backend
from neuron_export.plan import plan
from neuron_export.prepare import refuse_overlap


@dataclass
class CompileResult:
    """What a successful ``compile`` produced."""

    compiled_path: str
    files: list[str]
    smoke: dict


def check_prepared(prepared: Path, verify_checksums: bool = False) -> None:
    """Refuse anything but a complete ``prepare`` output."""
    report = inspect_checkpoint(prepared)
    if report.problems:
        more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise ExportError(f"{report.problems[0]}{more}")
    if report.layout != PREPARED:
        raise ExportError(f"{prepared}: not a prepared checkpoint (hub layout); run 'neuron_export prepare' first")
    verify_manifest(prepared, hashes=verify_checksums)


def compile_prepared(
    prepared: str | Path,
    compiled_path: str | Path,
    layout: Layout,
    neuron_python: str | None = None,
    adapter_src: str | None = None,
    prompt: str = "Hello! Please introduce yourself in one sentence.",
    max_new_tokens: int = 20,
    overwrite: bool = False,
    verify_checksums: bool = False,
) -> CompileResult:
    """Compile ``prepared`` for ``layout`` into ``compiled_path`` (see the module docstring)."""
    prepared, compiled_path = Path(prepared), Path(compiled_path)
    check_prepared(prepared, verify_checksums)
    refuse_overlap(prepared, compiled_path)
    checked = plan(prepared, layout)
    if checked.problems:
        raise ExportError("layout infeasible: " + "; ".join(checked.problems))
    output_dirs.check_output_dir(compiled_path, overwrite)
    adapter_src = adapter_dir(adapter_src)
    sdk = detect_sdk(neuron_python, adapter_src)
    if sdk.available and not (adapter_src and (Path(adapter_src) / ADAPTER_MODULE).is_file()):
        raise ExportError(
            f"Neuron SDK found but no MiMo adapter: pass --adapter-src (or set {ADAPTER_ENV}) to NxDI's "
            f"contrib/models/MiMo-V2-Flash/src holding {ADAPTER_MODULE}"
        )
    staging = output_dirs.staging_dir(compiled_path)
    staging.mkdir()
    try:
        bundle.write_bundle(staging, prepared, layout, adapter_src, prompt, max_new_tokens)
        if sdk.available:
            code = run_backend(
                sdk.python,
                [
                    "--model-path",
                    str(prepared.resolve()),
                    "--compiled-path",
                    str(staging.resolve()),
                    "--layout",
                    str(staging / bundle.LAYOUT_NAME),
                    "--adapter-src",
                    str(Path(adapter_src).resolve()),
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    str(max_new_tokens),
                ],
                adapter_src,
            )
            if code != 0:
                raise ExportError(
                    f"NxDI compile / smoke generation failed with exit code {code} (its log is above); "
                    f"nothing was written to {compiled_path}"
                )
        output_dirs.replace_directory(staging, compiled_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not sdk.available:
        raise ExportError(
            f"Neuron SDK not available to {sdk.python} ({sdk.detail}); wrote a ready-to-run bundle to "
            f"{compiled_path}: on a trn2 host run 'bash {compiled_path}/run_on_trn2.sh' (then serve_vllm.sh)"
        )
    smoke = json.loads((compiled_path / "smoke_generation.json").read_text())
    return CompileResult(str(compiled_path), sorted(p.name for p in compiled_path.iterdir()), smoke)
