"""In-memory FP8 export of a MiMo-V2-Flash Megatron model: what an RL framework streams into an FP8 rollout engine.

Megatron-Bridge's ``AutoBridge.export_hf_weights_quant`` quantizes one tensor at a time with a per-tensor function,
so it cannot write a K/V pair whose blocks span both projections (the release's ``fused_kv_split`` full layers).
:func:`export_hf_weights_fp8` streams ``AutoBridge.export_hf_weights`` through the same export plan and quantizer as
``convert_checkpoints.py export --dtype fp8``, so a vLLM / SGLang engine loaded from the release (or from a file
export) receives exactly the names, FP8 payloads and scales the file export writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from mimo_v2_flash.checkpoint.fp8_export import plan_fp8_export


def export_hf_weights_fp8(
    bridge,
    model,
    source_dir: str | Path,
    serve_tp: int | None = None,
    kv_layout: str = "auto",
    show_progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hub name, tensor)`` of ``model`` in ``source_dir``'s block-FP8 format, on the CPU.

    Args:
        bridge: The ``AutoBridge`` the model was built with.
        model: The Megatron model (or its list of pipeline chunks).
        source_dir: The HF checkpoint whose format is written (its FP8 layouts are decided from its data, as the
            import decides them; a BF16 source gives the release's format).
        serve_tp: Lay K/V out for a vLLM / SGLang server at this attention TP (default: the source's layout).
        kv_layout: ``--fp8-kv-layout`` the import was forced to, if any.
        show_progress: Megatron-Bridge's progress bar.

    Yields:
        FP8 weights each followed by its ``_scale_inv`` (MXFP4 experts by their ``_scale``; a MiMo-V2 family
        source's q/k/v as its fused ``qkv_proj``); every other tensor in the source's dtype. MiMo-V2.5's towers are
        not part of the model and are not streamed (an engine keeps its own).
    """
    plan = plan_fp8_export(Path(source_dir), kv_layout=kv_layout, serve_tp=serve_tp)
    chunks = model if isinstance(model, list) else [model]
    weights = bridge.export_hf_weights(chunks, cpu=True, show_progress=show_progress)
    yield from plan.quantize((name, tensor) for name, tensor in weights)
