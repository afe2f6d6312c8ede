"""Process-group and Megatron parallel-state set-up for scripts and tests (single process or torchrun)."""

from __future__ import annotations

import atexit

import torch

from mimo_v2_flash.runtime.cpu_adaptations import (
    apply_cpu_adaptations,
    cuda_absent,
    init_single_process_group,
)


def initialize_parallel_state(
    tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, vp: int | None = None, seed: int = 1234
) -> None:
    """Initialize torch.distributed and Megatron's model-parallel groups (idempotent for the same layout)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    apply_cpu_adaptations()
    if not torch.distributed.is_initialized():
        # A gloo group still alive at interpreter exit can abort the process after its work is done.
        atexit.register(shutdown_parallel_state)
    init_single_process_group()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if etp is not None else tp,
        virtual_pipeline_model_parallel_size=vp,
    )
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


def use_prebuilt_dataset_helpers() -> None:
    """Keep Megatron-Bridge's training set-up from rebuilding Megatron-Core's dataset helpers.

    ``megatron/bridge/training/initialize.py`` ``initialize_megatron`` calls
    ``megatron.core.datasets.utils.compile_helpers``, which runs ``make`` in the installed package; the
    megatron-core wheel ships the built ``helpers_cpp`` extension but no Makefile, so ``make`` fails and the
    job exits. Where the built extension imports, there is nothing to compile (with or without CUDA); a source
    checkout without it still compiles.
    """
    import importlib.util

    from megatron.bridge.training import initialize

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        initialize.compile_helpers = _helpers_already_built


def _helpers_already_built() -> None:
    return None


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
