"""Process-group and Megatron parallel-state set-up for scripts and tests (single process or torchrun)."""

from __future__ import annotations

import atexit
import os
import socket

import torch

from mimo_v2_flash.runtime.cpu_adaptations import cuda_absent


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def initialize_parallel_state(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vp: int | None = None,
    seed: int = 1234,
    cp: int = 1,
) -> None:
    """Initialize torch.distributed and Megatron's model-parallel groups (idempotent for the same layout).

    Without CUDA, call it inside ``cpu_adaptations.cpu_runtime()`` (model building asks CUDA for a device).
    """
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        # A gloo group still alive at interpreter exit can abort the process after its work is done.
        atexit.register(shutdown_parallel_state)
    init_single_process_group()
    etp = etp if etp is not None else tp
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        if current == (tp, pp, ep, etp, vp, cp):
            # Re-creating the groups would leave the old ones' gloo threads running (destroy_model_parallel only
            # drops Megatron's references): ~60 threads per call in a process that converts several times.
            _seed(seed)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        virtual_pipeline_model_parallel_size=vp,
        context_parallel_size=cp,
    )
    _seed(seed)


def _seed(seed: int) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    # Without CUDA there are no CUDA RNG states to track; the inference tracker keeps fork() a no-op.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=cuda_absent())
    torch.manual_seed(seed)


def shutdown_parallel_state() -> None:
    """Tear down Megatron's groups and the default process group (registered to run at exit)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shutdown_at_exit() -> None:
    """Tear down the process groups at interpreter exit (a live gloo group can abort the process there)."""
    atexit.register(shutdown_parallel_state)


def run_on_rank0(work):
    """Run ``work()`` on rank 0 only; every rank gets its result, or raises the one-line error it raised.

    Expected errors (``CheckpointError``, ``SFTDataError``) travel to every rank, so no rank waits forever in a
    collective for a rank that failed.
    """
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.training.sft_data import SFTDataError

    expected = (CheckpointError, SFTDataError)
    outcome: list = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = work()
        except expected as error:
            # The kind travels as an index and the message as text: the same error type is raised on every rank.
            outcome[1] = (next(i for i, kind in enumerate(expected) if isinstance(error, kind)), str(error))
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        kind, message = outcome[1]
        raise expected[kind](message)
    return outcome[0]
