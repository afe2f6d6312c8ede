"""Everything that lets Megatron-Core / Megatron-Bridge code run where CUDA (or TransformerEngine) is absent.

Nothing here does anything when CUDA is available. Configuration settings are preferred and live on the
provider (local attention backend, fusions off, ``moe_token_dispatcher_type="allgather"``,
``moe_grouped_gemm=False``, ``use_cpu_initialization``); what remains are call sites that ask CUDA for a device
unconditionally. Each adaptation names the upstream place and the failure it avoids.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
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

    ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` -> a stream that orders nothing and its no-op context.
    ``megatron/training/models/dist_utils.py`` (``_ddp_wrap``, every training run) wraps the model in DDP inside
    ``with torch.cuda.stream(torch.cuda.Stream())`` after ``wait_stream(torch.cuda.current_stream())``; creating a
    stream fails with "CUDA driver version is insufficient". CPU work runs in program order, so there is nothing
    for a stream to order.
    """
    if not cuda_absent():
        return False
    torch.cuda.Stream = _ProgramOrder
    torch.cuda.current_stream = _ProgramOrder
    torch.cuda.stream = _in_program_order
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.get_rng_state = _empty_cuda_rng_state
    torch.cuda.set_rng_state = _restore_empty_cuda_rng_state
    torch.cuda.synchronize = _nothing_to_synchronize
    torch.Tensor.cuda = _stay_on_cpu
    return True


class _ProgramOrder:
    """Stands for a CUDA stream where there is none: CPU operations already run in program order."""

    def __init__(self, device=None, priority: int = 0, **kwargs) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


@contextlib.contextmanager
def _in_program_order(stream=None):
    yield


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


def apply_cpu_training_settings(cfg) -> bool:
    """Settings of a Megatron-Bridge ``ConfigContainer`` that let its training loop run without CUDA.

    Configuration, not patches; applied only where CUDA is absent (returns whether they were):

    * ``dist.distributed_backend = "gloo"``: NCCL needs GPUs (``training/initialize.py``
      ``_initialize_distributed`` raises "Cannot initialize parallel groups with no CUDA devices").
    * fp32 parameters, no ``bf16_mixed``: bf16 parameters on the CPU trip the optimizer's type checks
      (``core/optimizer``: the fp32 main-parameter copy expects CUDA tensor types).
    * ``checkpoint.load_rng = False``: a checkpoint's CUDA RNG state cannot be restored without CUDA
      (``training/checkpointing.py`` ``load_checkpoint`` calls ``torch.cuda.set_rng_state``).
    * ``dataset.num_workers = 0``, ``pin_memory = False``, ``persistent_workers = False``: pinned host memory
      needs a CUDA driver, and persistent workers need worker processes.
    * the distributed optimizer off (``ddp`` and ``optimizer``), with its overlaps: its buffers and
      all-gathers assume CUDA (Megatron-Bridge on CPU: resume is inexact with it).
    * ``ddp.average_in_collective = False``: ``core/distributed/param_and_grad_buffer.py`` then all-reduces
      gradients with ``ReduceOp.AVG``, which made every iteration of the tiny model ~45% slower over gloo (640
      vs 440 ms, measured); scaling before a SUM gives the same mean.
    * the local backend (TransformerEngine needs CUDA) and the model settings of the provider's
      ``LOCAL_BACKEND_SETTINGS`` and ``CPU_MODEL_SETTINGS``.
    """
    if not cuda_absent():
        return False
    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import CPU_MODEL_SETTINGS, LOCAL_BACKEND_SETTINGS

    cfg.model.use_transformer_engine = False
    for name, value in {**LOCAL_BACKEND_SETTINGS, **CPU_MODEL_SETTINGS}.items():
        setattr(cfg.model, name, value)
    cfg.ddp.use_distributed_optimizer = cfg.optimizer.use_distributed_optimizer = False
    cfg.ddp.overlap_grad_reduce = cfg.ddp.overlap_param_gather = False
    cfg.ddp.average_in_collective = False
    cfg.dist.distributed_backend = "gloo"
    cfg.mixed_precision = None
    cfg.model.bf16 = cfg.model.fp16 = cfg.optimizer.bf16 = cfg.optimizer.fp16 = False
    cfg.model.params_dtype = cfg.model.pipeline_dtype = cfg.optimizer.params_dtype = torch.float32
    cfg.checkpoint.load_rng = False
    cfg.dataset.num_workers = 0
    cfg.dataset.pin_memory = False
    cfg.dataset.persistent_workers = False
    return True


@functools.cache
def apply_cpu_training_adaptations() -> bool:
    """The call sites of Megatron-Bridge's training set-up that require CUDA, adapted where it is absent.

    ``megatron/bridge/training/setup.py`` calls ``initialize_megatron(cfg, ...)`` without ``allow_no_cuda``, and
    ``training/initialize.py`` then asserts ``torch.cuda.is_available()`` ("Megatron requires CUDA"): the
    setting exists but ``setup`` does not expose it, so ``setup``'s reference is rebound to pass
    ``allow_no_cuda=True``.

    ``training/initialize.py`` ``_warmup_jit_function`` (called by ``set_jit_fusion_options`` on every set-up)
    warms the bias-GeLU / bias-dropout-add fusions on tensors created with ``device="cuda"``, which fails
    without a driver; with fusions off (the provider's setting) there is nothing to warm, so it is skipped.

    ``training/initialize.py`` ``_set_random_seed`` seeds Megatron-Core's model-parallel RNG tracker only when
    ``torch.cuda.device_count() > 0``; model building then fails in ``tensor_parallel/random.py`` ``fork``
    ("cuda rng state model-parallel-rng is not added"). After the upstream seeding, the tracker is set up the
    way it works without CUDA: the inference tracker, whose ``fork`` keeps the CPU generator, seeded as
    upstream seeded torch's.

    Returns whether the adaptations were applied (only without CUDA; idempotent).
    """
    if not cuda_absent():
        return False
    from megatron.bridge.training import initialize, setup

    upstream_initialize = setup.initialize_megatron
    setup.initialize_megatron = functools.partial(upstream_initialize, allow_no_cuda=True)
    initialize._warmup_jit_function = _no_fusions_to_warm_up
    upstream_set_random_seed = initialize._set_random_seed

    def set_random_seed_with_cpu_tracker(*args, **kwargs) -> None:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        upstream_set_random_seed(*args, **kwargs)
        model_parallel_cuda_manual_seed(torch.initial_seed(), inference_rng_tracker=True)

    initialize._set_random_seed = set_random_seed_with_cpu_tracker

    from megatron.core.optimizer import optimizer

    # core/optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts every gradient is a
    # torch.cuda.FloatTensor before scaling it; the optimizer's step calls it whenever clip_grad > 0.
    assert hasattr(optimizer, "clip_grad_by_total_norm_fp32"), (
        "megatron-core 0.19: optimizer.clip_grad_by_total_norm_fp32"
    )
    optimizer.clip_grad_by_total_norm_fp32 = _clip_cpu_grads_by_total_norm
    return True


def _clip_cpu_grads_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """Upstream's clipping (scale every gradient by ``max_norm / (total_norm + 1e-6)`` when below 1) for CPU
    gradients; the norm itself is upstream's ``get_grad_norm_fp32`` (its ``device="cuda"`` literals are
    rewritten by :func:`cuda_literals_on_cpu`)."""
    attribute = "decoupled_grad" if use_decoupled_grad else "grad"
    coefficient = max_norm / (total_norm + 1.0e-6)
    if isinstance(coefficient, torch.Tensor):
        coefficient = coefficient.clamp_max(1.0)
    elif coefficient >= 1.0:
        return
    for parameter in parameters if isinstance(parameters, list | tuple) else [parameters]:
        grad = getattr(parameter, attribute, None)
        if grad is not None:
            grad.detach().mul_(coefficient)


def _no_fusions_to_warm_up(model_config, micro_batch_size: int) -> None:
    return None


def transformer_engine_absent() -> bool:
    """True where TransformerEngine is not installed (Megatron-Core then puts placeholders in its TE classes)."""
    return importlib.util.find_spec("transformer_engine") is None


@functools.cache
def apply_peft_adaptations_without_te() -> bool:
    """Megatron-Bridge's LoRA without TransformerEngine: its TE checks must say False.

    ``megatron/core/extensions/transformer_engine.py`` defines placeholder (mock) TE classes when TE is
    missing, so ``megatron/bridge/peft/utils.py`` and ``peft/module_matcher.py`` import them "successfully" and
    set ``HAVE_TE = True``; ``get_adapter_attributes_from_linear`` then calls ``isinstance`` with a mock (or
    ``None``) and fails with "isinstance() arg 2 must be a type". The flags are set to what is true: no TE.

    Returns whether the adaptation was applied (only without TransformerEngine; idempotent).
    """
    if not transformer_engine_absent():
        return False
    from megatron.bridge.peft import module_matcher, utils

    utils.HAVE_TE = False
    module_matcher.HAVE_TE = False
    module_matcher.HAVE_TE_COL_LINEAR = module_matcher.HAVE_TE_LN_COL_LINEAR = module_matcher.HAVE_TE_ROW_LINEAR = (
        False
    )
    return True
