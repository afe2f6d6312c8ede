"""Memory reused across the tensors of a conversion instead of allocated anew for each.

Conversion produces gigabytes of short-lived tensors of a few recurring sizes (one per weight kind). Each fresh
allocation of that size is new memory to the process, and the kernel zeroes every page of it on first touch: in
an import that zeroing took about 70% of the time of the thread computing the weights. Reusing the storage of a
tensor that has been written and dropped avoids it.
"""

from __future__ import annotations

import math
import threading

import torch


def owning_just_its_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or when it is a contiguous part of a larger storage, the same memory as a tensor whose storage
    is exactly its bytes (``torch.save`` writes whole storages). DLPack keeps the larger storage referenced."""
    if tensor.numel() == 0 or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return torch.from_dlpack(tensor)


def is_unreferenced(storage: torch.UntypedStorage) -> bool:
    """True when ``storage`` is held by nothing but this Python storage object (no tensor, view or DLPack export).

    PyTorch's reference count of the storage (its Python object counts once). Where PyTorch no longer offers it,
    nothing is considered free, and storages are simply not reused.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(storage._cdata) == 1


class RecycledStorages:
    """Hands out empty tensors backed by recycled storages; a storage is reused only when no tensor refers to it.

    Free storages are kept for reuse up to ``max_free_bytes`` in all (the least recently handed out are released
    first), so the memory this adds to what callers hold is bounded. A free storage is reused for a request of at
    least half its size, so a large free storage is not kept busy by small tensors. At most ``max_tracked``
    storages are remembered at all, so callers that keep many tensors do not make each request slower.
    """

    def __init__(self, max_free_bytes: int = 128 * 1024**2, max_tracked: int = 64) -> None:
        self.max_free_bytes = max_free_bytes
        self.max_tracked = max_tracked
        self._storages: list[torch.UntypedStorage] = []  # least recently handed out first
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape`` and ``dtype`` whose storage holds exactly its bytes."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            storage = self._reusable(nbytes)
            if storage is None:
                storage = torch.UntypedStorage(nbytes)
            else:
                self._storages.remove(storage)
            self._forget_beyond_limits()
            self._storages.append(storage)
            # Referenced before the lock is released, so that no other thread sees it free.
            tensor = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        return owning_just_its_bytes(tensor)

    def free_bytes(self) -> int:
        """Bytes of the remembered storages that no tensor refers to."""
        with self._lock:
            return sum(s.nbytes() for s in self._storages if is_unreferenced(s))

    def _reusable(self, nbytes: int) -> torch.UntypedStorage | None:
        fitting = [s for s in self._storages if nbytes <= s.nbytes() <= 2 * nbytes and is_unreferenced(s)]
        return min(fitting, key=lambda s: s.nbytes(), default=None)

    def _forget_beyond_limits(self) -> None:
        free = [s for s in self._storages if is_unreferenced(s)]
        excess = sum(s.nbytes() for s in free) - self.max_free_bytes
        for storage in free:
            if excess <= 0:
                break
            self._storages.remove(storage)
            excess -= storage.nbytes()
        del self._storages[: max(0, len(self._storages) + 1 - self.max_tracked)]
