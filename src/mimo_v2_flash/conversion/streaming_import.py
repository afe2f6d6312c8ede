"""Single-process HF -> Megatron import with bounded memory: tensors are computed while they are written.

The model is built on the meta device. Megatron-Bridge's own ``save_checkpoint`` writes the checkpoint (so it is
the same torch_dist checkpoint training loads) with a save strategy whose planner materializes each tensor only
when PyTorch's file writer asks for it: the parameter behind a write item (found through its meta storage) is
produced by the bridge's HF -> Megatron mapping from the (FP8-dequantizing) checkpoint reader, the item's view of
it is written, and it is dropped. While the writer writes one parameter, a worker thread computes the following
ones (reading, dequantizing and mapping overlap with writing); memory holds the parameter being written, up to
``COMPUTE_AHEAD_BYTES`` of parameters computed ahead (always the next one), and the file writer's buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from mimo_v2_flash.checkpoint.reused_memory import owning_just_its_bytes

COMPUTE_AHEAD_BYTES = 128 * 1024**2


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class ParameterMaterializer:
    """Computes real values for meta parameters of ``model`` from an HF checkpoint, one parameter at a time.

    All mapping work runs on one worker thread, in request order: given the expected order (:meth:`expect`), the
    parameters after the one being written are computed meanwhile, up to ``ahead_bytes`` of them (always the
    next one). Alive are the current value and those ahead: writing a large parameter is not slowed by computing
    the next, and a run of small ones does not leave the writer waiting for each.
    """

    def __init__(self, model, bridge, hf_state, progress=None, ahead_bytes: int = COMPUTE_AHEAD_BYTES) -> None:
        self.model = model
        self.bridge = bridge
        self.hf_state = hf_state
        self.registry = bridge.mapping_registry()
        self.names: dict[int, str] = {}  # meta storage -> parameter or buffer name
        self.metas: dict[str, torch.Tensor] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if self.names.setdefault(_storage_key(tensor), name) == name:
                self.metas[name] = tensor
        self.tensors = 0
        self.progress = progress
        self.ahead_bytes = ahead_bytes
        self._current: tuple[str, torch.Tensor] | None = None
        self._order: list[str] = []
        self._position: dict[str, int] = {}
        self._pending: dict[str, Future] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="materialize")

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is (a view of) one of the model's parameters or buffers, wherever it was created."""
        return _storage_key(tensor) in self.names

    def unproduced(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` (what the checkpoint will hold) that no HF weight produces."""
        return [name for name in names if self.registry.megatron_to_hf_lookup(name) is None]

    def expect(self, views: Iterable[torch.Tensor]) -> None:
        """The meta views in the order they will be asked for; computing the first ones starts now."""
        order = []
        for view in views:
            name = self.names[_storage_key(view)]
            if not order or order[-1] != name:
                order.append(name)
        self._order = order
        self._position = {name: i for i, name in enumerate(order)}
        self._submit_ahead(-1)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._current = None

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        """The real data of a meta tensor ``view`` (a view of some parameter or buffer)."""
        real = self._parameter(self.names[_storage_key(view)])
        # PyTorch's writer would clone a part of a larger storage (every fused gate|up is written as two halves).
        item = owning_just_its_bytes(torch.as_strided(real, view.shape, view.stride(), view.storage_offset()))
        if self.progress is not None:
            self.progress(item.numel() * item.element_size())
        return item

    def _parameter(self, name: str) -> torch.Tensor:
        if self._current is not None and self._current[0] == name:
            return self._current[1]
        self._current = None  # the writer is done with it: free it before the next value lands
        future = self._submit(name)
        position = self._position.get(name, -1)
        for unexpected in [n for n in self._pending if self._position.get(n, -1) <= position and n != name]:
            self._pending.pop(unexpected).cancel()  # skipped or out of the expected order
        value = future.result()
        del self._pending[name]
        self._current = (name, value)
        if position >= 0:
            self._submit_ahead(position)
        return value

    def _submit_ahead(self, position: int) -> None:
        ahead = 0
        for count, following in enumerate(self._order[position + 1 :]):
            meta = self.metas[following]
            ahead += meta.numel() * meta.element_size()
            if count > 0 and ahead > self.ahead_bytes:
                break
            self._submit(following)

    def _submit(self, name: str) -> Future:
        if name not in self._pending:
            self._pending[name] = self._worker.submit(self._compute, name)
        return self._pending[name]

    def _compute(self, name: str) -> torch.Tensor:
        meta = self.metas[name]
        mapping = self.registry.megatron_to_hf_lookup(name)
        if mapping is None:
            raise ValueError(f"{name}: the checkpoint holds it but no HF weight produces it")
        module = self.model.get_submodule(name.rsplit(".", 1)[0])
        module.to_empty(device="cpu", recurse=False)
        try:
            hf_weights = self.bridge.maybe_modify_loaded_hf_weight(mapping.hf_param, self.hf_state)
            value = mapping.hf_to_megatron(hf_weights, module).to("cpu", meta.dtype).contiguous()
        finally:
            module.to_empty(device="meta", recurse=False)
        if tuple(value.shape) != tuple(meta.shape):
            raise ValueError(f"{name}: mapped to shape {tuple(value.shape)}, the model expects {tuple(meta.shape)}")
        self.tensors += 1
        return value


@functools.cache
def materializing_save_strategy_class() -> type:
    """Megatron-Core's torch_dist save strategy whose tensors are produced lazily by PyTorch's serial file writer.

    Built on first use: the subclasses need Megatron-Core, which this module does not import at load time.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class MaterializingPlanner(MCoreSavePlanner):
        def __init__(self, materialize: ParameterMaterializer, **kwargs) -> None:
            super().__init__(**kwargs)
            self.materialize = materialize

        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            # The file writer resolves the items in plan order (one file each): announce it for computing ahead.
            tensors = [self.lookup_object(item.index) for item in plan.items if item.type != WriteItemType.BYTE_IO]
            self.materialize.expect(t for t in tensors if isinstance(t, torch.Tensor) and self.materialize.owns(t))
            return plan

        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            # Every parameter and buffer is produced from the HF weights, not only those on the meta device: on a CUDA
            # host Megatron-Core creates some buffers (the router's expert_bias) on the GPU, zero-filled.
            if isinstance(data, torch.Tensor) and self.materialize.owns(data):
                return self.materialize(data)
            return data

    class MaterializingSaveStrategy(TorchDistSaveShardedStrategy):
        """torch_dist save whose tensors are produced lazily, item by item, by PyTorch's serial file writer."""

        def __init__(self, materialize) -> None:
            super().__init__("torch_dist", 1)
            self.materialize = materialize

        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            planner = MaterializingPlanner(
                self.materialize,
                dedup_replicated_tensors=not self.keep_only_main_replica,
                flatten_state_dict=False,
                flatten_sharded_tensors=False,
            )
            # One file per item: PyTorch's writer keeps every tensor of a file alive until the file is closed.
            # No fsync per file: the whole directory only becomes visible by the final rename.
            writer = FileSystemWriter(
                str(checkpoint_dir), single_file_per_rank=False, thread_count=1, sync_files=False
            )
            try:
                dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
            finally:
                self.materialize.close()

        def can_handle_sharded_objects(self) -> bool:
            return True

    return MaterializingSaveStrategy


def stream_import(hf_dir: Path, megatron_path: Path, dtype: torch.dtype) -> int:
    """Write ``megatron_path`` (a complete Megatron-Bridge checkpoint) from ``hf_dir``; returns tensors written."""
    from megatron.bridge.training.checkpointing import get_checkpoint_name, save_checkpoint, save_tokenizer_assets
    from megatron.bridge.training.config import CheckpointConfig, ConfigContainer, LoggerConfig, OptimizerConfig
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    from megatron.bridge import AutoBridge
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.runtime.inference import build_meta_model, configure_provider

    auto = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = configure_provider(auto.to_megatron_provider(load_weights=False), dtype, parallel_output=True)
    # The local backend writes the same checkpoint keys as TransformerEngine (see the layer specs) and builds on
    # the meta device whatever the host (TE layers would be created on the CPU under use_cpu_initialization).
    provider.use_transformer_engine = False
    model = build_meta_model(provider)
    params = [*model.named_parameters(), *model.named_buffers()]
    total_bytes = sum(t.numel() * t.element_size() for _, t in params)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="import", mininterval=1.0)
    model_bridge = auto._model_bridge  # a property: a new bridge on every access
    model_bridge.fp8_dequant_dtype = dtype
    materializer = ParameterMaterializer(model, model_bridge, auto.hf_pretrained.state, progress=bar.update)
    held = [name for name, value in model.state_dict(keep_vars=True).items() if isinstance(value, torch.Tensor)]
    unproduced = materializer.unproduced(held)
    if unproduced:
        raise CheckpointError(
            f"{hf_dir}: no HF weight produces Megatron's {unproduced[0]} (and {len(unproduced) - 1} more)"
        )
    has_tokenizer = any(hf_dir.glob("tokenizer*"))
    tokenizer = (
        TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(hf_dir)) if has_tokenizer else None
    )
    state = GlobalState()
    state.cfg = ConfigContainer(
        model=provider,
        train=None,
        optimizer=OptimizerConfig(use_distributed_optimizer=False),
        ddp=None,
        scheduler=None,
        dataset=None,
        logger=LoggerConfig(),
        tokenizer=tokenizer,
        checkpoint=CheckpointConfig(
            async_save=False,
            save=str(megatron_path),
            save_optim=False,
            save_rng=False,
            ckpt_format="torch_dist",
            dist_ckpt_optim_fully_reshardable=True,
        ),
        dist=None,
    )
    save_checkpoint(
        state=state,
        model=[model],
        optimizer=None,
        opt_param_scheduler=None,
        num_floating_point_operations_so_far=0,
        checkpointing_context={"save_strategy": materializing_save_strategy_class()(materializer)},
        callback_manager=None,
    )
    bar.close()
    if tokenizer is not None:
        save_tokenizer_assets(
            build_tokenizer(tokenizer), tokenizer, get_checkpoint_name(str(megatron_path), 0, release=False)
        )
    return materializer.tensors
