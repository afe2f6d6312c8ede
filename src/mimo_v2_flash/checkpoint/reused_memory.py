"""Tensors handed to PyTorch's checkpoint writer as storages of exactly their bytes.

``torch.save`` writes whole storages, so PyTorch's writer clones a tensor that is a contiguous part of a larger
storage (every fused gate|up is written as two halves). Re-wrapping the same memory avoids that copy (measured in
``docs/conversion_mechanisms.md``: the import's peak RSS is about 15% higher without it).
"""

from __future__ import annotations

import torch


def owning_just_its_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or when it is a contiguous part of a larger storage, the same memory as a tensor whose storage
    is exactly its bytes (``torch.save`` writes whole storages). DLPack keeps the larger storage referenced."""
    if tensor.numel() == 0 or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return torch.from_dlpack(tensor)
