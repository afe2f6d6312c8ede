"""LoRA fine-tuning outputs: find the base and the adapters, merge them, and name the adapters the HF/PEFT way.

A LoRA run of Megatron-Bridge saves only the adapter weights; its ``run_config.yaml`` names the pretrained
checkpoint that holds the frozen base. The merge is done in Megatron's parameter space, before the bridge's
mappings split fused tensors: ``W + alpha / dim * B @ A`` on the fused ``linear_qkv`` / ``linear_fc1`` rows is
exactly what the adapter adds to the layer's output, whatever the Q/K/V head dims and KV head counts, and the
same mappings that export the base then export the merged weight. For a PEFT adapter, ``B``'s rows go through
those mappings (they split rows only) and every HF module cut from one fused Megatron module shares its ``A``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
from mimo_v2_flash.checkpoint.megatron_dirs import latest_iteration_dir

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraRun:
    """Where a LoRA run's pieces are: the adapter checkpoint, the base checkpoint, and the adapter shape."""

    adapter_dir: Path
    base_checkpoint: Path
    dim: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


def find_lora_run(megatron_path: str | Path) -> LoraRun | None:
    """The LoRA run saved under ``megatron_path`` (its latest iteration), or None for full weights."""
    directory = latest_iteration_dir(megatron_path)
    run_config = directory / "run_config.yaml"
    if not run_config.is_file():
        return None
    config = yaml.safe_load(run_config.read_text())
    peft = config.get("peft")
    if not peft:
        return None
    if not str(peft.get("_target_", "")).endswith(".LoRA"):
        raise CheckpointError(f"{run_config}: PEFT method {peft.get('_target_')} is not supported (LoRA only)")
    base = (config.get("checkpoint") or {}).get("pretrained_checkpoint")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{run_config}: the LoRA run's pretrained checkpoint {base!r} is not a directory")
    return LoraRun(
        adapter_dir=directory,
        base_checkpoint=Path(base),
        dim=int(peft["dim"]),
        alpha=float(peft["alpha"] if peft.get("alpha") is not None else peft["dim"]),
        target_modules=tuple(peft.get("target_modules") or ()),
    )


def adapter_key(param_name: str, checkpoint_key: str) -> tuple[str, int | None] | None:
    """Checkpoint key prefix of the adapter of a Megatron weight, and the expert index for routed experts.

    Checkpoint keys, not module paths, name the adapters (an MTP layer's ``mtp_model_layer`` is saved as
    ``transformer_layer``); routed experts' adapters are stacked along a leading expert axis.
    """
    if not checkpoint_key.endswith(".weight"):
        return None
    prefix = checkpoint_key.removesuffix(".weight") + ".adapter"
    if ".local_experts." in param_name:
        return prefix, int(param_name.split(".local_experts.", 1)[1].split(".", 1)[0])
    return prefix, None


class LoraAdapters:
    """Reads a LoRA run's adapter factors on demand (one module's at a time) and merges them into base weights."""

    def __init__(self, run: LoraRun) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.run = run
        self.reader = FileSystemReader(str(run.adapter_dir))
        self.metadata = self.reader.read_metadata().state_dict_metadata
        self.used: set[str] = set()

    def unused(self) -> list[str]:
        """Adapters in the checkpoint that no base weight asked for (a merge that would silently drop them)."""
        suffix = ".linear_in.weight"
        prefixes = {key.removesuffix(suffix) for key in self.metadata if key.endswith(".adapter" + suffix)}
        return sorted(prefix for prefix in prefixes if not prefix.startswith("optimizer.") and prefix not in self.used)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one instance per export; keeps a layer's fc1/fc2 stacks
    def _load(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        meta = self.metadata[key]
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
        dcp.load(state, storage_reader=self.reader, no_dist=True)
        return state[key]

    def factors(self, param_name: str, checkpoint_key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A [r, in], B [out, r])`` of the adapter on ``param_name``, or None if it has none."""
        located = adapter_key(param_name, checkpoint_key)
        if located is None:
            return None
        prefix, expert = located
        a_key, b_key = f"{prefix}.linear_in.weight", f"{prefix}.linear_out.weight"
        if a_key not in self.metadata or b_key not in self.metadata:
            return None
        self.used.add(prefix)
        a, b = self._load(a_key), self._load(b_key)
        return (a[expert], b[expert]) if expert is not None else (a, b)

    def merged(self, param_name: str, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``base + alpha / dim * B @ A`` in fp32.

        Left in fp32 so the export rounds it once, to the dtype it writes: the sum of a bf16 base and its adapter is
        not a bf16 number, and casting it back to the base's dtype made a ``--dtype float32`` export of a bf16 run
        (every GPU run) lose the merge's low bits (logits off by 1e-2 on the tiny model on an H200).
        """
        if (b.shape[0], a.shape[1]) != tuple(base.shape):
            raise CheckpointError(
                f"{self.run.adapter_dir}: adapter of {param_name} is {tuple(b.shape)} x {tuple(a.shape)}, "
                f"the base weight is {tuple(base.shape)}"
            )
        delta = self.run.scale * (b.to(torch.float32) @ a.to(torch.float32))
        return base.to(torch.float32) + delta


def peft_tensor_names(hf_weight_name: str) -> tuple[str, str]:
    """PEFT's names of the A and B factors of an HF weight (``...q_proj.weight`` -> ``...q_proj.lora_A.weight``)."""
    module = PEFT_PREFIX + hf_weight_name.removesuffix(".weight")
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def peft_adapter_config(run: LoraRun, target_modules: list[str], base_model: str) -> dict:
    """``adapter_config.json`` for ``peft.PeftModel.from_pretrained``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": run.dim,
        "lora_alpha": run.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(target_modules),
        "inference_mode": True,
    }


def apply_lora_adapters(chunks: list[torch.nn.Module], run: LoraRun) -> list[torch.nn.Module]:
    """Wrap a loaded base model with the run's LoRA adapters (as Megatron-Bridge trains them) and load them.

    The result computes what the LoRA run's model computes: base linears plus unmerged adapters.
    """
    from megatron.bridge.peft.lora import LoRA
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime

    lora = LoRA(target_modules=list(run.target_modules), dim=run.dim, alpha=run.alpha, dropout=0.0)
    with cpu_runtime(peft=True):
        chunks = lora(chunks, training=False)
    for chunk in chunks:
        # LoRA builds the adapters in the base config's params_dtype (bf16 for a GPU-trained base), which would
        # round fp32-trained adapters as they load; they take the dtype the model runs in instead.
        dtype = next(p.dtype for name, p in chunk.named_parameters() if ".adapter." not in name)
        for name, param in chunk.named_parameters():
            if ".adapter." in name:
                param.data = param.data.to(dtype)
        sharded = {
            name: item
            for name, item in chunk.sharded_state_dict().items()
            if ".adapter." in name and "_extra_state" not in name
        }
        loaded = dist_checkpointing.load(
            sharded, str(run.adapter_dir), TorchDistLoadShardedStrategy(), validate_access_integrity=False
        )
        adapter_params = {name for name in chunk.state_dict() if ".adapter." in name and "_extra_state" not in name}
        missing = adapter_params - set(loaded)
        if missing:
            raise CheckpointError(f"{run.adapter_dir}: adapter weights missing, e.g. {sorted(missing)[:2]}")
        chunk.load_state_dict({name: loaded[name] for name in adapter_params}, strict=False)
    return chunks
