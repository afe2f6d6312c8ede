"""Everything that lets Megatron-Core / Megatron-Bridge code run where CUDA is absent, in one place.

Nothing here does anything when CUDA is available. Configuration settings are preferred and live on the
provider (local attention backend, fusions off, ``moe_token_dispatcher_type="allgather"``,
``moe_grouped_gemm=False``, ``use_cpu_initialization``); what remains are call sites that ask CUDA for a device
unconditionally. Each adaptation names the upstream place and the failure it avoids.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode


def cuda_absent() -> bool:
    """True on machines without a usable CUDA device (the only case where adaptations apply)."""
    return not torch.cuda.is_available()


def _cpu_current_device() -> torch.device:
    # The default device: the CPU, or "meta" inside a ``torch.device("meta")`` model-building context.
    return torch.get_default_device()


@functools.cache
def apply_cpu_adaptations() -> bool:
    """Apply the adaptations if CUDA is absent; returns whether they were applied (idempotent).

    ``torch.cuda.current_device`` -> the default device (the CPU; "meta" while a model is built on meta).
    Without CUDA it raises ``RuntimeError: Found no NVIDIA driver``; Megatron-Core calls it unconditionally
    for tensor placement in:
    ``transformer/moe/router.py`` (``TopKRouter.__init__`` expert-bias buffers, ``Router.gating`` moving the
    weight), ``transformer/multi_token_prediction.py`` (``roll_tensor`` receive buffers, MTP loss tracker),
    ``models/gpt/gpt_model.py`` (static-inference ``sequence_len_offset``) and
    ``models/common/embeddings/rotary_pos_embedding.py`` (``inv_freq`` placement without
    ``use_cpu_initialization``). In those places the returned value is only used as a ``device=`` argument, so
    the default device is the faithful answer; with CUDA present the function is left untouched.

    ``torch.cuda.get_rng_state`` / ``set_rng_state`` -> an empty state / a no-op for that empty state.
    ``megatron/bridge/training/checkpointing.py`` (``get_rng_state``, called by every ``save_checkpoint``,
    including ``model_load_save.save_megatron_model``) records the CUDA RNG state unconditionally and fails with
    ``Found no NVIDIA driver``. Without CUDA there is no CUDA RNG, so its faithful state is empty; restoring
    anything but that empty state still raises.

    ``torch.cuda.synchronize`` -> no-op. ``megatron/core/dist_checkpointing/strategies/filesystem_async.py``
    (``preload_tensors``, every distributed-checkpoint save) and ``megatron/core/timers.py`` synchronize the
    device unconditionally; with no CUDA stream there is nothing to wait for.

    ``torch.Tensor.cuda`` -> the tensor itself. ``megatron/core/models/common/language_module/language_module.py``
    (``setup_embeddings_and_output_layer``) moves the embedding copy shared across pipeline stages (pipeline
    parallelism with MTP or tied embeddings) with ``weight.data.cuda()`` before its all-reduce, which raises
    without a driver; the CPU tensor is where the data already lives.
    """
    if not cuda_absent():
        return False
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.get_rng_state = _empty_cuda_rng_state
    torch.cuda.set_rng_state = _restore_empty_cuda_rng_state
    torch.cuda.synchronize = _nothing_to_synchronize
    torch.Tensor.cuda = _stay_on_cpu
    return True


def _stay_on_cpu(self: torch.Tensor, device=None, non_blocking: bool = False, **kwargs) -> torch.Tensor:
    return self


def _nothing_to_synchronize(device=None) -> None:
    return None


def _empty_cuda_rng_state(device="cuda") -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _restore_empty_cuda_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    if new_state.numel():
        raise RuntimeError("cannot restore a CUDA RNG state on a machine without CUDA")


def init_single_process_group(backend: str | None = None) -> None:
    """Start the default process group: from torchrun's environment, or a private one-rank group otherwise.

    gloo without CUDA, nccl with it. The one-rank group listens on a free loopback port passed explicitly, so
    nothing is exported to child processes' environment.
    """
    if torch.distributed.is_initialized():
        return
    backend = backend or ("gloo" if cuda_absent() else "nccl")
    if not cuda_absent():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group(backend=backend)
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_literals_on_cpu():
    """Within the block, tensors that upstream code creates with a literal ``device="cuda"`` land on the CPU.

    ``megatron/core/pipeline_parallel/schedules.py`` (``forward_backward_pipelining_without_interleaving``:
    ``torch.zeros([], dtype=torch.int, device="cuda")`` for the token count) fails without a driver. A function
    can't be swapped for a literal, so pipeline schedules run under this torch-function mode. No-op with CUDA.
    """
    if not cuda_absent():
        yield
        return
    with _CudaLiteralsToCpu():
        yield
