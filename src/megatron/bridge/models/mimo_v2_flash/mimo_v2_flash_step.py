"""Training forward step for MiMo-V2-Flash: Megatron-Bridge's GPT step, with the loss mask reaching MTP.

Megatron-Bridge 0.6.2's ``gpt_step`` computes the LM loss with the batch's loss mask but calls the model without
it, and Megatron-Core's MTP loss (``multi_token_prediction.py``, ``loss_mask is None`` -> all ones) then covers
every position: prompt and padding tokens of SFT data too. The MTP loss of a fine-tuning run would then depend on
how batches are padded, and the MTP layers would learn to predict prompts and padding. This step is
``gpt_step.forward_step`` with the mask handed to the model as well.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from megatron.bridge.training import gpt_step


def forward_step(state, data_iterator: Iterable, model: torch.nn.Module, return_schedule_plan: bool = False):
    """``gpt_step.forward_step`` whose model call also receives the batch's ``loss_mask`` (used by MTP)."""
    batch_loss_mask: list[torch.Tensor | None] = [None]

    def get_batch_keeping_mask(*args, **kwargs):
        batch = gpt_step.get_batch(*args, **kwargs)
        batch_loss_mask[0] = batch[2]
        return batch

    def pass_loss_mask(module, args, kwargs):
        if batch_loss_mask[0] is not None:
            kwargs.setdefault("loss_mask", batch_loss_mask[0])
        return args, kwargs

    handle = model.register_forward_pre_hook(pass_loss_mask, with_kwargs=True)
    try:
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
