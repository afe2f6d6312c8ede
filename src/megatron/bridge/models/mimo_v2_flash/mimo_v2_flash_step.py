"""Training forward step for MiMo-V2-Flash: Megatron-Bridge's GPT step, with the MTP loss of one process.

Two upstream gaps make the MTP loss of a fine-tune differ from what its data defines; this step closes both,
each only within the step (entered before the model call and undone after it):

* The loss mask. Megatron-Bridge 0.6.2's ``gpt_step`` computes the LM loss with the batch's loss mask but calls
  the model without it, and Megatron-Core's MTP loss (``multi_token_prediction.py``, ``loss_mask is None`` -> all
  ones) then covers every position: prompt and padding tokens of SFT data too. The MTP loss would then depend on
  how batches are padded, and the MTP layers would learn to predict prompts and padding. The step hands the mask
  to the model as well.
* Context parallelism. Megatron-Core 0.19's ``process_mtp_loss`` (``transformer/multi_token_prediction.py``)
  rolls the targets and the loss mask across the CP chunks correctly (``roll_tensor``: the load-balanced split's
  chunks ``r`` and ``2CP-1-r`` exchange their boundary tokens with the neighbouring ranks), but normalizes with
  this rank's token counts: with per-token loss sums (which Megatron-Bridge requires of a CP fine-tune), the
  gradient carries each rank's own ``tokens / shifted tokens`` ratio, and the logged ``mtp_1 loss`` is an average
  of per-rank means over the DP x CP group (half the one-process loss at CP 2 when the answer tokens sit on one
  rank). Under CP the step runs :func:`mtp_loss_over_context_parallel` in its place, which takes both counts
  summed over the CP group and logs this rank's share of the sequence's mean (summed over CP, averaged over DP):
  one process's loss, gradient and log.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from megatron.bridge.training import gpt_step

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

# Where GPTModel looks the MTP loss up (its module global), and the upstream signature this replacement mirrors.
MTP_LOSS_OWNER = "megatron.core.models.gpt.gpt_model"
MTP_LOSS_PARAMETERS = (
    "hidden_states",
    "labels",
    "loss_mask",
    "output_layer",
    "output_weight",
    "runtime_gather_output",
    "is_training",
    "compute_language_model_loss",
    "config",
    "cp_group",
    "tp_group",
    "packed_seq_params",
    "scale_logits_fn",
    "input_ids",
)


def forward_step(state, data_iterator: Iterable, model: torch.nn.Module, return_schedule_plan: bool = False):
    """``gpt_step.forward_step`` whose model call also receives the batch's ``loss_mask`` (used by MTP), with the
    MTP loss normalized over the whole sequence under context parallelism."""
    batch_loss_mask: list[torch.Tensor | None] = [None]

    def get_batch_keeping_mask(*args, **kwargs):
        batch = gpt_step.get_batch(*args, **kwargs)
        batch_loss_mask[0] = batch[2]
        return batch

    def pass_loss_mask(module, args, kwargs):
        if batch_loss_mask[0] is not None:
            kwargs.setdefault("loss_mask", batch_loss_mask[0])
        return args, kwargs

    model_config = state.cfg.model
    over_cp = model_config.context_parallel_size > 1 and bool(model_config.mtp_num_layers)
    handle = model.register_forward_pre_hook(pass_loss_mask, with_kwargs=True)
    try:
        with mtp_loss_over_context_parallel_patched() if over_cp else contextlib.nullcontext():
            output, loss_mask = gpt_step._forward_step_common(
                state, data_iterator, model, return_schedule_plan, _get_batch_fn=get_batch_keeping_mask
            )
    finally:
        handle.remove()
    loss_function = gpt_step._create_loss_function(
        loss_mask,
        check_for_nan_in_loss=state.cfg.rerun_state_machine.check_for_nan_in_loss,
        check_for_spiky_loss=state.cfg.rerun_state_machine.check_for_spiky_loss,
    )
    return output, loss_function


@contextlib.contextmanager
def mtp_loss_over_context_parallel_patched() -> Iterator[None]:
    """Within the block, ``GPTModel`` computes the MTP loss with :func:`mtp_loss_over_context_parallel`.

    Raises:
        RuntimeError: Megatron-Core's ``process_mtp_loss`` is not where, or not what, this was written against
            (megatron-core 0.19): a silent no-op would bring the per-rank normalization back.
    """
    import importlib

    from megatron.core.transformer import multi_token_prediction

    owner = importlib.import_module(MTP_LOSS_OWNER)
    upstream = getattr(owner, "process_mtp_loss", None)
    if upstream is not multi_token_prediction.process_mtp_loss or (
        tuple(inspect.signature(upstream).parameters) != MTP_LOSS_PARAMETERS
    ):
        raise RuntimeError(
            f"{MTP_LOSS_OWNER}.process_mtp_loss is not megatron-core 0.19's (the CP-exact MTP loss was written "
            "against it)"
        )
    owner.process_mtp_loss = _per_token_over_cp_or(upstream)
    try:
        yield
    finally:
        owner.process_mtp_loss = upstream


def _per_token_over_cp_or(upstream: Callable) -> Callable:
    """:func:`mtp_loss_over_context_parallel` where it applies (CP > 1, per-token loss sums), else ``upstream``."""

    def process_mtp_loss(*args, **kwargs):
        arguments = inspect.signature(upstream).bind(*args, **kwargs)
        arguments.apply_defaults()
        cp_group, config = arguments.arguments["cp_group"], arguments.arguments["config"]
        if cp_group is None or cp_group.size() == 1 or not config.calculate_per_token_loss:
            return upstream(*args, **kwargs)
        return mtp_loss_over_context_parallel(**arguments.arguments)

    return process_mtp_loss


def mtp_loss_over_context_parallel(
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    output_layer: Callable,
    output_weight: torch.Tensor | None,
    runtime_gather_output: bool | None,
    is_training: bool,
    compute_language_model_loss: Callable,
    config: TransformerConfig,
    cp_group: torch.distributed.ProcessGroup,
    tp_group: torch.distributed.ProcessGroup | None = None,
    packed_seq_params=None,
    scale_logits_fn: Callable | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Megatron-Core 0.19's ``process_mtp_loss`` with per-token loss sums, its token counts taken over the CP group.

    Upstream, step for step; what differs is marked. With ``O`` the sequence's loss tokens and ``R_k`` those left
    after ``k`` shifts, both summed over the CP ranks, each rank's MTP term is ``scale * sum(mask * loss) * O /
    R_k``: summed over the ranks and divided by the LM's token count (``finalize_model_grads``), the one-process
    ``scale * mean(loss)``. Upstream used this rank's ``O`` and ``R_k``.

    Args:
        hidden_states: The decoder's output with the MTP layers' outputs concatenated along the sequence.
        labels: This rank's targets (None: rolled from ``input_ids``).
        loss_mask: This rank's loss mask (None: all ones).
        output_layer: The output layer.
        output_weight: The output weight to use (shared embeddings), or None.
        runtime_gather_output: Whether the output layer gathers its output across TP.
        is_training: Whether to record the loss for logging.
        compute_language_model_loss: The model's per-token cross entropy.
        config: The model's ``TransformerConfig``.
        cp_group: The context-parallel group (size > 1).
        tp_group: The tensor-parallel group (acceptance counts of vocab-sharded logits).
        packed_seq_params: Packed-sequence parameters, or None.
        scale_logits_fn: A logits scaling (MuP), or None.
        input_ids: The input tokens (used when ``labels`` is None).

    Returns:
        The decoder's hidden states, carrying the MTP losses' backward.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import (
        MTPLossAutoScaler,
        MTPLossLoggingHelper,
        _compute_mtp_acceptance_counts,
        roll_tensor,
    )

    def roll(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return roll_tensor(tensor, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)

    hidden_states_list = torch.chunk(hidden_states, 1 + config.mtp_num_layers, dim=0)
    hidden_states = hidden_states_list[0]
    derived_labels_from_input_ids = labels is None
    if labels is None:
        if input_ids is None:
            return hidden_states
        labels, _ = roll(input_ids)
    if config.mtp_detach_heads:
        output_weight = output_weight.detach() if output_weight is not None else output_layer.weight.detach()
    mtp_labels = labels.clone()
    if loss_mask is None:
        loss_mask = torch.ones_like(mtp_labels)
    if derived_labels_from_input_ids:
        loss_mask, _ = roll(loss_mask)
    # Differs: the sequence's token count, over every CP rank.
    original_num_tokens = _summed_over(cp_group, loss_mask.sum())
    # Differs: logged as this rank's share of the sequence's mean, summed over CP and averaged over DP only.
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    mtp_loss_scale = config.mtp_loss_scaling_factor / config.mtp_num_layers
    for mtp_layer_number in range(config.mtp_num_layers):
        mtp_logits, _ = output_layer(
            hidden_states_list[mtp_layer_number + 1], weight=output_weight, runtime_gather_output=runtime_gather_output
        )
        if scale_logits_fn is not None:
            mtp_logits = scale_logits_fn(mtp_logits)
        mtp_labels, _ = roll(mtp_labels)
        loss_mask, local_num_tokens = roll(loss_mask)
        # Differs: the shifted targets' count, over every CP rank.
        num_tokens = _summed_over(cp_group, local_num_tokens).clamp(min=1)
        mtp_loss = loss_mask * compute_language_model_loss(mtp_labels, mtp_logits)
        if is_training:
            correct, total = _compute_mtp_acceptance_counts(
                mtp_logits, mtp_labels, loss_mask, output_layer, runtime_gather_output, tp_group
            )
            MTPLossLoggingHelper.save_metrics_to_tracker(
                torch.sum(mtp_loss) / num_tokens,
                correct,
                total,
                mtp_layer_number,
                config.mtp_num_layers,
                reduce_group=cp_group,
                avg_group=dp_group,
            )
        hidden_states = MTPLossAutoScaler.apply(
            hidden_states, mtp_loss_scale * mtp_loss * (original_num_tokens / num_tokens)
        )
    return hidden_states


def _summed_over(group: torch.distributed.ProcessGroup, count: torch.Tensor) -> torch.Tensor:
    """``count`` summed over the ranks of ``group`` (a new tensor, outside autograd)."""
    total = count.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return total
