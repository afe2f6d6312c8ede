"""Load a MiMo-V2-Flash Megatron model (from HF through the bridge) and run greedy generation."""

from __future__ import annotations

from pathlib import Path

import torch

from mimo_v2_flash.runtime.cpu_adaptations import cuda_absent, cuda_literals_on_cpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def configure_provider(
    provider,
    dtype: torch.dtype,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vp: int | None = None,
    parallel_output: bool = False,
    cp: int = 1,
):
    """Apply dtype and parallel layout to a provider (``parallel_output=False``: full logits on every rank)."""
    provider.params_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.fp16 = False
    provider.pipeline_dtype = dtype
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.expert_model_parallel_size = ep
    provider.expert_tensor_parallel_size = etp if etp is not None else tp
    provider.virtual_pipeline_model_parallel_size = vp
    provider.context_parallel_size = cp
    provider.sequence_parallel = False
    provider.parallel_output = parallel_output
    provider.use_cpu_initialization = cuda_absent()
    provider.finalize()
    return provider


def build_model(provider) -> torch.nn.Module | list[torch.nn.Module]:
    """Instantiate (and, with the provider's pre-wrap hooks, load) the model: one module, or the list of this
    rank's chunks with virtual pipeline stages."""
    models = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=cuda_absent())
    for chunk in models:
        chunk.eval()
    return models[0] if len(models) == 1 else models


def build_meta_model(provider) -> torch.nn.Module:
    """The model with every parameter on the meta device (shapes only, nothing allocated or initialized).

    CPU initialization allocates without an explicit device, so under the meta-device context nothing is
    allocated. The provider is left describing a normally built model (it may be saved in a run_config).
    """
    provider.perform_initialization = False
    model = provider.provide_distributed_model(
        wrap_with_ddp=False,
        init_model_with_meta_device=True,
        use_cpu_initialization=True,
        mixed_precision_wrapper=None,
    )[0]
    provider.perform_initialization, provider.init_model_with_meta_device = True, False
    return model


def load_from_hf(hf_path: str | Path, dtype: torch.dtype = torch.float32, **layout) -> torch.nn.Module:
    """HF checkpoint -> Megatron model through ``AutoBridge`` (weights streamed through the mapping registry)."""
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(hf_path))
    provider = configure_provider(bridge.to_megatron_provider(load_weights=True), dtype, **layout)
    return build_model(provider)


def _device(model) -> torch.device:
    first = model[0] if isinstance(model, list) else model
    return next(first.parameters()).device


@torch.no_grad()
def forward_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` (fp32) of one sequence's forward pass, on every rank."""
    from megatron.core import parallel_state

    device = _device(model)
    if parallel_state.get_context_parallel_world_size() > 1:
        return _context_parallel_forward_logits(model, token_ids, device)
    ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    positions = torch.arange(len(token_ids), device=device).unsqueeze(0)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return model(ids, positions, None, runtime_gather_output=True)[0].float()
    return _pipeline_forward_logits(model, ids, positions)


def _context_parallel_forward_logits(model, token_ids: list[int], device) -> torch.Tensor:
    """One sequence under context parallelism: padded at the end to a multiple of ``2 * CP`` (causal attention
    keeps the padding out of every real token), split as Megatron's training split does, the local logits
    gathered and put back in order."""
    from megatron.core import parallel_state

    from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.context_parallel import (
        gather_sequence,
        gathered_positions,
        local_positions,
    )

    group = parallel_state.get_context_parallel_group()
    size, rank = group.size(), group.rank()
    padded = -(-len(token_ids) // (2 * size)) * 2 * size
    mine = local_positions(padded // size, rank, size, device)
    ids = torch.tensor(token_ids + [0] * (padded - len(token_ids)), dtype=torch.long, device=device)[mine]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # Each CP rank runs its share through the stages; the schedule sizes their messages as full length / CP.
        local = _pipeline_forward_logits(model, ids.unsqueeze(0), mine.unsqueeze(0), seq_length=padded)
    else:
        with cuda_literals_on_cpu():  # Megatron's RoPE split pins a CPU tensor (no driver on a CPU host)
            local = model(ids.unsqueeze(0), mine.unsqueeze(0), None, runtime_gather_output=True)[0].float()
    logits = torch.empty(padded, local.size(-1), dtype=local.dtype, device=device)
    logits[gathered_positions(padded // size, size, device)] = gather_sequence(local, group)
    return logits[: len(token_ids)]


def _pipeline_forward_logits(
    model, ids: torch.Tensor, positions: torch.Tensor, seq_length: int | None = None
) -> torch.Tensor:
    """Forward through Megatron's pipeline schedule; the last stage's logits are broadcast to all stages.

    ``seq_length`` is the whole sequence's length (default: ``ids``'s), which under context parallelism is
    ``CP`` times the ``ids`` of this rank.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = {}

    def forward_step(data_iterator, chunk):
        def keep_logits(output):
            captured["logits"] = output
            return output.sum() * 0, {}

        return chunk(ids, positions, None, runtime_gather_output=True), keep_logits

    with cuda_literals_on_cpu():
        chunks = model if isinstance(model, list) else [model]
        # The interleaved (virtual-pipeline) schedule needs at least PP micro-batches: repeat the same sequence.
        microbatches = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([None] * microbatches) for _ in chunks] if len(chunks) > 1 else iter([None]),
            model=chunks,
            num_microbatches=microbatches,
            seq_length=seq_length or ids.shape[1],
            micro_batch_size=1,
            forward_only=True,
        )
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    shape = torch.tensor(captured["logits"].shape if "logits" in captured else [0, 0, 0], dtype=torch.long)
    torch.distributed.broadcast(shape, last, group=group)
    logits = captured.get("logits")
    if logits is None:
        logits = torch.empty(*shape.tolist(), dtype=torch.float32, device=ids.device)
    logits = logits.float().contiguous()
    torch.distributed.broadcast(logits, last, group=group)
    return logits[0]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None):
    """Greedy decoding by re-running the full sequence each step (exact; no KV cache). Returns new ids."""
    tokens = list(prompt_ids)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(forward_logits(model, tokens)[-1].argmax())
        tokens.append(next_id)
        new_tokens.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
    return new_tokens
