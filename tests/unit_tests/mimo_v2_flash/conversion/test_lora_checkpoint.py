"""The LoRA merge keeps its low bits until the export's own dtype rounds it."""

from __future__ import annotations

from pathlib import Path

import torch

from mimo_v2_flash.conversion.lora_checkpoint import LoraAdapters, LoraRun


def adapters(dim: int, alpha: float) -> LoraAdapters:
    merger = LoraAdapters.__new__(LoraAdapters)  # the merge reads no checkpoint
    merger.run = LoraRun(Path("run"), Path("base"), dim=dim, alpha=alpha, target_modules=("linear_qkv",))
    return merger


def test_merge_of_a_bf16_base_is_exact_in_fp32():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(48, 32, generator=generator).to(torch.bfloat16)
    a = (torch.randn(8, 32, generator=generator) * 0.1).to(torch.bfloat16)
    b = (torch.randn(48, 8, generator=generator) * 0.1).to(torch.bfloat16)
    merged = adapters(dim=8, alpha=16.0).merged("decoder.layers.0.self_attention.linear_qkv.weight", base, a, b)
    # What the LoRA model computes, written out: W x + (alpha / r) B (A x), i.e. W + 2 B A, in fp32.
    expected = base.double() + 2.0 * (b.double() @ a.double())
    assert merged.dtype == torch.float32
    assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-6)
    # A bf16 export rounds it once; most merged values are not bf16 numbers, so the fp32 merge must not be either.
    assert not torch.equal(merged, merged.to(torch.bfloat16).float())
