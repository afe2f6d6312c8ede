"""Everything that lets Megatron-Core / Megatron-Bridge code run where CUDA (or TransformerEngine) is absent.

Configuration comes first: the provider's ``CPU_MODEL_SETTINGS`` / ``LOCAL_BACKEND_SETTINGS`` and
:func:`apply_cpu_training_settings` for the training configuration. What configuration cannot reach is patched,
only inside :func:`cpu_runtime` (the launchers enter it; everything is restored on exit) and only where the
condition of each patch holds. Before patching, each target is checked to exist, naming the version the patch was
written against, so a renamed upstream attribute fails loudly instead of being silently added.

Patch table: patch (condition; version written against) | upstream call site | failure it avoids.

=============================================  ==================================================================
``torch.cuda.current_device`` -> default       mcore ``moe/router.py`` (expert bias), ``multi_token_prediction.py``,
device (no CUDA; torch 2.14)                   ``gpt_model.py``, ``rotary_pos_embedding.py`` | "Found no NVIDIA driver"
``torch.cuda.get_rng_state`` -> empty state    MB ``training/checkpointing.py`` ``get_rng_state`` (every save) |
(no CUDA; torch 2.14)                          "Found no NVIDIA driver"
``torch.cuda.set_rng_state`` -> only the       MB ``training/checkpointing.py`` (load) | "Found no NVIDIA driver"
empty state (no CUDA; torch 2.14)
``torch.cuda.synchronize`` -> no-op            mcore ``dist_checkpointing/strategies/filesystem_async.py``
(no CUDA; torch 2.14)                          ``preload_tensors``, ``timers.py`` | "Found no NVIDIA driver" on save
``torch.Tensor.cuda`` -> the tensor itself     mcore ``language_module.py`` ``setup_embeddings_and_output_layer`` |
(no CUDA; torch 2.14)                          "Found no NVIDIA driver" with PP and MTP or tied embeddings
``cuda.Stream``, ``cuda.current_stream``,      MB ``training/models/dist_utils.py`` ``_ddp_wrap`` |
``cuda.stream`` -> program order (no CUDA)     "CUDA driver version is insufficient"
``setup.initialize_megatron`` -> with          MB 0.6.2 ``training/setup.py``; ``initialize.py`` asserts CUDA |
``allow_no_cuda=True`` (training; no CUDA)     "Megatron requires CUDA"
``initialize._warmup_jit_function`` ->         MB 0.6.2 ``set_jit_fusion_options`` warms fusions (off here) on
nothing (training; no CUDA)                    ``device="cuda"`` tensors | "Found no NVIDIA driver"
``initialize._set_random_seed`` -> then the    MB 0.6.2 seeds the model-parallel RNG tracker only with CUDA |
CPU RNG tracker (training; no CUDA)            "cuda rng state model-parallel-rng is not added"
``optimizer.clip_grad_by_total_norm_fp32`` ->  mcore 0.19 ``optimizer/clip_grads.py`` asserts
the same scaling (training; no CUDA)           ``torch.cuda.FloatTensor`` grads | ``AssertionError`` (clip_grad > 0)
``initialize.compile_helpers`` -> nothing      MB 0.6.2 ``initialize_megatron`` runs ``make`` in megatron-core |
(training; prebuilt helpers, any host)         ``make`` fails: the wheel ships the extension, no Makefile
``utils.HAVE_TE``, ``module_matcher.HAVE_TE``  MB 0.6.2 ``peft/utils.py``, ``module_matcher.py`` test mcore's TE
``module_matcher.HAVE_TE_COL_LINEAR``,         placeholders | "isinstance() arg 2 must be a type"
``module_matcher.HAVE_TE_LN_COL_LINEAR``,
``module_matcher.HAVE_TE_ROW_LINEAR`` -> False
(LoRA; no TransformerEngine)
=============================================  ==================================================================

Pipeline schedules also create tensors with a literal ``device="cuda"``; :func:`cuda_literals_on_cpu` rewrites
those within its block (a torch-function mode, entered around the schedule only).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode


class UpstreamChanged(RuntimeError):
    """A patch's upstream target is missing: the installed version differs from the one the patch was made for."""


def cuda_absent() -> bool:
    """True on machines without a usable CUDA device (where the CPU adaptations apply)."""
    return not torch.cuda.is_available()


def transformer_engine_absent() -> bool:
    """True where TransformerEngine is not installed (Megatron-Core then puts placeholders in its TE classes)."""
    return importlib.util.find_spec("transformer_engine") is None


def _without_cuda() -> bool:
    return cuda_absent()  # looked up at call time, so a test can simulate either host


def _without_transformer_engine() -> bool:
    return transformer_engine_absent()


def prebuilt_dataset_helpers() -> bool:
    """Megatron-Core's dataset helper extension is built (the wheel ships it); nothing needs compiling."""
    return importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None


def _helpers_prebuilt() -> bool:
    return prebuilt_dataset_helpers()


@dataclass(frozen=True)
class Patch:
    """One attribute replaced inside :func:`cpu_runtime`; ``make`` builds the replacement from the original."""

    owner: str
    name: str
    make: Callable[[object], object]
    applies: Callable[[], bool]
    tested: str

    def resolve(self) -> object:
        """The object holding the attribute; raises :class:`UpstreamChanged` if it or the attribute is missing."""
        module, _, attribute = self.owner.partition(":")
        try:
            owner = importlib.import_module(module)
        except ImportError as error:
            raise UpstreamChanged(f"{self.owner}: cannot import {module} (patch written for {self.tested})") from error
        for part in filter(None, attribute.split(".")):
            owner = getattr(owner, part)
        if not hasattr(owner, self.name):
            raise UpstreamChanged(f"{self.owner}.{self.name} not found (patch written for {self.tested})")
        return owner


def _constant(value) -> Callable[[object], object]:
    return lambda original: value


def _seed_then_cpu_tracker(upstream_set_random_seed):
    def set_random_seed_with_cpu_tracker(*args, **kwargs) -> None:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        upstream_set_random_seed(*args, **kwargs)
        model_parallel_cuda_manual_seed(torch.initial_seed(), inference_rng_tracker=True)

    return set_random_seed_with_cpu_tracker


TORCH = "torch 2.14"
MCORE = "megatron-core 0.19"
MBRIDGE = "megatron-bridge 0.6.2"
TORCH_PATCHES = (
    Patch("torch.cuda", "current_device", _constant(lambda: torch.get_default_device()), _without_cuda, TORCH),
    Patch("torch.cuda", "get_rng_state", _constant(lambda device="cuda": torch.empty(0, dtype=torch.uint8)),
          _without_cuda, TORCH),
    Patch("torch.cuda", "set_rng_state", lambda original: _restore_empty_cuda_rng_state, _without_cuda, TORCH),
    Patch("torch.cuda", "synchronize", _constant(lambda device=None: None), _without_cuda, TORCH),
    Patch("torch:Tensor", "cuda", lambda original: _stay_on_cpu, _without_cuda, TORCH),
    Patch("torch.cuda", "Stream", lambda original: _ProgramOrder, _without_cuda, TORCH),
    Patch("torch.cuda", "current_stream", lambda original: _ProgramOrder, _without_cuda, TORCH),
    Patch("torch.cuda", "stream", lambda original: _in_program_order, _without_cuda, TORCH),
)  # fmt: skip
TRAINING_PATCHES = (
    Patch("megatron.bridge.training.setup", "initialize_megatron",
          lambda original: functools.partial(original, allow_no_cuda=True), _without_cuda, MBRIDGE),
    Patch("megatron.bridge.training.initialize", "_warmup_jit_function",
          _constant(lambda model_config, micro_batch_size: None), _without_cuda, MBRIDGE),
    Patch("megatron.bridge.training.initialize", "_set_random_seed", _seed_then_cpu_tracker, _without_cuda, MBRIDGE),
    Patch("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
          lambda original: _clip_cpu_grads_by_total_norm, _without_cuda, MCORE),
    Patch("megatron.bridge.training.initialize", "compile_helpers", _constant(lambda: None),
          _helpers_prebuilt, MBRIDGE),
)  # fmt: skip
PEFT_PATCHES = tuple(
    Patch(module, flag, _constant(False), _without_transformer_engine, MBRIDGE)
    for module, flags in (
        ("megatron.bridge.peft.utils", ("HAVE_TE",)),
        ("megatron.bridge.peft.module_matcher",
         ("HAVE_TE", "HAVE_TE_COL_LINEAR", "HAVE_TE_LN_COL_LINEAR", "HAVE_TE_ROW_LINEAR")),
    )
    for flag in flags
)  # fmt: skip

_MISSING = object()
_active: dict[tuple[str, str], list] = {}  # (owner, name) -> [depth, owner object, own value or _MISSING]


@contextlib.contextmanager
def patched(patches: tuple[Patch, ...]) -> Iterator[list[Patch]]:
    """Apply the patches whose condition holds; undo them on exit (nested entries are counted, not re-applied)."""
    entered: list[tuple[str, str]] = []
    applied: list[Patch] = []
    try:
        for patch in patches:
            if not patch.applies():
                continue
            key = (patch.owner, patch.name)
            if key not in _active:
                owner = patch.resolve()
                original = getattr(owner, patch.name)
                _active[key] = [0, owner, vars(owner).get(patch.name, _MISSING)]
                setattr(owner, patch.name, patch.make(original))
            _active[key][0] += 1
            entered.append(key)
            applied.append(patch)
        yield applied
    finally:
        for key in reversed(entered):
            state = _active[key]
            state[0] -= 1
            if state[0] == 0:
                del _active[key]
                _, owner, own = state
                if own is _MISSING:
                    delattr(owner, key[1])
                else:
                    setattr(owner, key[1], own)


@contextlib.contextmanager
def cpu_runtime(training: bool = False, peft: bool = False) -> Iterator[list[Patch]]:
    """Within the block, upstream code runs on this host: the patches of the module table whose condition holds.

    Args:
        training: also Megatron-Bridge's training set-up (``setup``, ``initialize``, the optimizer's clipping).
        peft: also Megatron-Bridge's LoRA without TransformerEngine.

    Yields the patches applied (none on a CUDA host with TransformerEngine, apart from ``compile_helpers``).
    """
    patches = TORCH_PATCHES + (TRAINING_PATCHES if training else ()) + (PEFT_PATCHES if peft else ())
    with patched(patches) as applied:
        yield applied


def active_patches() -> list[str]:
    """``owner.name`` of every patch in effect now (for tests and diagnostics)."""
    return [f"{owner}.{name}" for owner, name in _active]


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


def _restore_empty_cuda_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    if new_state.numel():
        raise RuntimeError("cannot restore a CUDA RNG state on a machine without CUDA")


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments of torch calls to the CPU, and drops ``pin_memory=True`` (pinning
    needs a CUDA driver)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_literals_on_cpu():
    """Within the block, tensors that upstream code creates with a literal ``device="cuda"`` land on the CPU.

    ``megatron/core/pipeline_parallel/schedules.py`` (``forward_backward_pipelining_without_interleaving``:
    ``torch.zeros([], dtype=torch.int, device="cuda")`` for the token count) fails without a driver, and so does
    ``megatron/core/models/common/embeddings/rope_utils.py`` (``get_pos_emb_on_this_cp_rank``, under context
    parallelism: ``torch.tensor(..., pin_memory=True)``). A function can't be swapped for a literal, so pipeline
    schedules run under this torch-function mode. No-op with CUDA.
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
