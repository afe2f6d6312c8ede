"""Megatron distributed checkpoints of MiMo-V2-Flash: atomic save, load (any layout), latest-iteration lookup.

Saving and loading go through Megatron-Bridge's own ``training.model_load_save`` (torch_dist format with
``run_config.yaml``), so fine-tuning loads what ``convert_checkpoints.py import`` writes and vice versa.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir
from mimo_v2_flash.checkpoint.output_dirs import replace_directory, staging_dir
from mimo_v2_flash.runtime.cpu_adaptations import cuda_absent


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_megatron_checkpoint(
    model: torch.nn.Module, path: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """Save atomically (replacing ``path`` if it exists): all ranks write a hidden sibling, rank 0 renames it."""
    from megatron.bridge.training.model_load_save import save_megatron_model

    path = Path(path)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    staging = staging_dir(path) if rank0 else path.parent / f".{path.name}.partial"
    _barrier()
    has_tokenizer = tokenizer_dir is not None and any(Path(tokenizer_dir).glob("tokenizer*"))
    save_megatron_model([model], str(staging), hf_tokenizer_path=str(tokenizer_dir) if has_tokenizer else None)
    _barrier()
    if rank0:
        replace_directory(staging, path)
    _barrier()
    return path


def load_megatron_checkpoint(
    path: str | Path,
    dtype: torch.dtype | None = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vp: int | None = None,
    backend: str = "auto",
    cp: int = 1,
):
    """Load the latest weights under ``path`` at the given parallel layout; optionally cast to ``dtype``.

    The model is built with the backend of this host (``backend_settings``), not the one recorded in the
    checkpoint's run config: a checkpoint trained with TransformerEngine loads on a CPU machine and the reverse.
    A LoRA fine-tuning output loads as its base checkpoint with the trained adapters applied (unmerged).
    """
    from megatron.bridge.training.model_load_save import load_megatron_model

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import backend_settings
    from mimo_v2_flash.conversion.lora_checkpoint import apply_lora_adapters, find_lora_run

    lora_run = find_lora_run(path)
    directory = latest_iteration_dir(lora_run.base_checkpoint if lora_run is not None else path)
    overrides = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp if etp is not None else tp,
        "virtual_pipeline_model_parallel_size": vp,
        "context_parallel_size": cp,
        **backend_settings(backend),
    }
    if vp:
        # The saved value matches the layout the checkpoint was written at, not the one it is loaded at.
        overrides["microbatch_group_size_per_vp_stage"] = pp
    models = load_megatron_model(
        str(directory),
        use_cpu_init=cuda_absent(),
        skip_temp_dist_context=dist.is_initialized(),
        mp_overrides=overrides,
    )
    chunks = [
        chunk.to(dtype) if dtype is not None else chunk for chunk in (models if isinstance(models, list) else [models])
    ]
    if lora_run is not None:
        # After the cast: the adapters are loaded in the model's dtype, not rounded to the base checkpoint's first.
        chunks = apply_lora_adapters(chunks, lora_run)
    chunks = [chunk.eval() for chunk in chunks]
    return chunks[0] if len(chunks) == 1 else chunks


def read_leading_slice(reader, key: str, index: int) -> torch.Tensor:
    """``tensor[index]`` of the checkpoint tensor ``key``, reading only the stored chunks that hold it.

    Routed experts are saved as one tensor per weight kind with a leading expert axis, one chunk per expert (or
    per expert and tensor-parallel slice); Megatron-Core's loader reads such a tensor whole. This reads one
    expert's chunks with PyTorch's checkpoint reader and a plan naming exactly those chunks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    meta = reader.read_metadata().state_dict_metadata[key]
    target = torch.empty((1, *meta.size[1:]), dtype=meta.properties.dtype)
    items, covered = [], 0
    for chunk in meta.chunks:
        if not chunk.offsets[0] <= index < chunk.offsets[0] + chunk.sizes[0]:
            continue
        lengths = torch.Size((1, *chunk.sizes[1:]))
        items.append(
            ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(key, torch.Size([0] * len(meta.size))),
                dest_offsets=torch.Size((0, *chunk.offsets[1:])),
                storage_index=MetadataIndex(key, chunk.offsets),
                storage_offsets=torch.Size((index - chunk.offsets[0], *[0] * (len(meta.size) - 1))),
                lengths=lengths,
            )
        )
        covered += lengths.numel()
    if covered != target.numel():
        raise CheckpointError(f"{reader.path}: the chunks of {key} do not cover slice {index} exactly")

    class ChunksOfOneSlice(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            return LoadPlan(items)

    dcp.load({key: target}, storage_reader=reader, planner=ChunksOfOneSlice(), no_dist=True)
    return target[0]


class _MetadataOnceReader(FileSystemReader):
    """PyTorch's checkpoint file reader, parsing ``.metadata`` once for all the per-expert reads of an export."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._parsed_metadata = None

    def read_metadata(self):
        if self._parsed_metadata is None:
            self._parsed_metadata = super().read_metadata()
        return self._parsed_metadata


LARGE_WEIGHT_BYTES = 32 * 1024**2


def _group_of(name: str, key: str) -> str:
    """Load unit: one routed expert's weight (read on its own), the rest of one decoder / MTP layer, or the
    remaining top-level tensors."""
    parts = name.split(".")
    if "local_experts" in parts:
        return name
    for root in ("decoder.layers", "mtp.layers"):
        depth = root.count(".") + 1
        if ".".join(parts[:depth]) == root and len(parts) > depth:
            return ".".join(parts[: depth + 1])
    return "other"


def iter_hf_weights(path: str | Path, mapping_registry, lora=None, adapter_sink=None):
    """Stream ``(hf_name, tensor)`` from a Megatron checkpoint one layer at a time (single process).

    The model is built on the meta device; each layer's slice of the distributed checkpoint is loaded into
    freshly allocated CPU tensors, mapped to HF names with the bridge's mappings, yielded and freed. Memory holds
    one layer, whatever layout the checkpoint was saved at.

    Args:
        path: Megatron checkpoint (or training output directory) with the weights.
        mapping_registry: The bridge's Megatron <-> HF mappings.
        lora: ``LoraAdapters`` of a LoRA run whose base is ``path``: each adapted weight is yielded merged.
        adapter_sink: Called with ``(hf_name, A, B_rows)`` for each HF weight that has an adapter (the HF
            modules cut from one fused Megatron module share its ``A``).
    """
    from megatron.bridge.training.model_load_save import load_model_config
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import backend_settings
    from mimo_v2_flash.runtime.inference import build_meta_model

    directory = latest_iteration_dir(path)
    provider, _ = load_model_config(str(directory))
    # A meta-device model only names the checkpoint's tensors: the local backend builds it on any host, with the
    # same checkpoint keys as TransformerEngine.
    for name, value in {
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": 1,
        "context_parallel_size": 1,
        **backend_settings("local"),
    }.items():
        setattr(provider, name, value)
    provider.finalize()
    model = build_meta_model(provider)
    metadata = dist_checkpointing.load_content_metadata(
        preloaded_state_dict=dist_checkpointing.load_common_state_dict(str(directory))
    )
    sharded = model.sharded_state_dict(metadata=metadata)
    reader = _MetadataOnceReader(str(directory))
    groups: dict[str, list[str]] = {}
    for name, item in sharded.items():
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            # A large weight (the dense layer's linear_fc1 is 256 MiB in bf16) is read on its own, so a layer's
            # large weights are never resident together.
            large = item.data.numel() * item.data.element_size() >= LARGE_WEIGHT_BYTES
            groups.setdefault(name if large else _group_of(name, item.key), []).append(name)
    for group in sorted(groups, key=_group_sort_key):
        if ".local_experts." in group:
            # built at EP 1, so the local expert index is the global one
            expert = int(group.split(".local_experts.", 1)[1].split(".", 1)[0])
            loaded = {group: read_leading_slice(reader, sharded[group].key, expert)}
        else:
            subset = {}
            for name in groups[group]:
                item = sharded[name]
                item.data = torch.empty(item.data.shape, dtype=item.data.dtype)
                subset[name] = item
            # A group is a subset of the checkpoint's tensors: partial access to the checkpoint is intended.
            loaded = dist_checkpointing.load(
                {"model": subset}, str(directory), TorchDistLoadShardedStrategy(), validate_access_integrity=False
            )["model"]
        for name in groups[group]:
            mapping = mapping_registry.megatron_to_hf_lookup(name)
            if mapping is None:
                continue
            module = model.get_submodule(name.rsplit(".", 1)[0])
            weight = loaded[name]
            if lora is not None:
                factors = lora.factors(name, sharded[name].key)
                if factors is not None:
                    if adapter_sink is not None:
                        for hf_name, b_rows in mapping.megatron_to_hf(factors[1], module).items():
                            adapter_sink(hf_name, factors[0], b_rows)
                    weight = lora.merged(name, weight, *factors)
            yield from mapping.megatron_to_hf(weight, module).items()
        for name in groups[group]:  # give the group's memory back before the next load
            sharded[name].data = torch.empty(sharded[name].data.shape, dtype=sharded[name].data.dtype, device="meta")
        del loaded


def _group_sort_key(group: str) -> tuple:
    """Decoder layers in order, then MTP layers, then the top-level tensors (embedding, final norm, output layer)."""
    parts = group.split(".")
    if group.startswith(("decoder.layers.", "mtp.layers.")) and len(parts) > 2:
        return (0 if group.startswith("decoder") else 1, int(parts[2]), group)
    return (2, group)
