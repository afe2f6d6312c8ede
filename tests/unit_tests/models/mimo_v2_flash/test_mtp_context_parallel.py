"""The fine-tuning step's MTP loss under context parallelism equals one process's: gradient and logged loss.

Each CP rank holds chunks ``r`` and ``2CP-1-r`` of the sequence (Megatron's load-balanced split); MTP's shifted
targets and loss mask cross every chunk boundary, and the answer tokens sit on some ranks only. The one-process
reference is Megatron-Core's own ``process_mtp_loss``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mimo_testing import skip_unless_ranks_fit

HIDDEN, VOCAB, MTP_LAYERS, CHUNK = 8, 16, 2, 4


class _Config:
    """The ``TransformerConfig`` fields the MTP loss reads."""

    mtp_num_layers = MTP_LAYERS
    mtp_loss_scaling_factor = 0.3
    mtp_detach_heads = False
    calculate_per_token_loss = True


class _OutputLayer:
    """A bias-free linear head, called as Megatron's ``ColumnParallelLinear`` is."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, hidden, weight=None, runtime_gather_output=None):
        return hidden @ (self.weight if weight is None else weight).t(), None


def _cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of ``[s, b, V]`` logits, as ``GPTModel.compute_language_model_loss``."""
    return torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")


def _inputs(cp: int) -> dict[str, torch.Tensor]:
    """One sequence of ``2 * cp`` chunks: prompt (chunk 0), answer (chunks 1 and 2), padding (the rest)."""
    seq = 2 * cp * CHUNK
    generator = torch.Generator().manual_seed(cp)
    loss_mask = torch.zeros(1, seq)
    loss_mask[:, CHUNK : 3 * CHUNK] = 1.0
    return {
        "hidden": torch.randn((1 + MTP_LAYERS) * seq, 1, HIDDEN, generator=generator),
        "labels": torch.randint(0, VOCAB, (1, seq), generator=generator),
        "loss_mask": loss_mask,
        "weight": torch.randn(VOCAB, HIDDEN, generator=generator),
    }


def _split(tensor: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    chunks = tensor.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


def _unsplit(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    halves = [piece.chunk(2, dim=dim) for piece in pieces]
    return torch.cat([first for first, _ in halves] + [second for _, second in reversed(halves)], dim=dim)


def _mtp_loss(process_mtp_loss, data: dict[str, torch.Tensor], cp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP layers' hidden-state gradient and the logged per-layer losses, as GPTModel calls the MTP loss."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    # The tracker is a class-level dict: sized by the first MTP model of the process (another test's, in a suite).
    earlier = dict(MTPLossLoggingHelper.tracker)
    MTPLossLoggingHelper.tracker.clear()
    hidden = data["hidden"].clone().requires_grad_(True)
    output = process_mtp_loss(
        hidden_states=hidden,
        labels=data["labels"],
        loss_mask=data["loss_mask"],
        output_layer=_OutputLayer(data["weight"]),
        output_weight=None,
        runtime_gather_output=None,
        is_training=True,
        compute_language_model_loss=_cross_entropy,
        config=_Config(),
        cp_group=cp_group,
        tp_group=None,
        packed_seq_params=None,
        scale_logits_fn=None,
        input_ids=None,
    )
    torch.autograd.backward(output, torch.zeros_like(output))  # the MTP losses' backward only
    MTPLossLoggingHelper.reduce_metrics_in_tracker()
    logged = MTPLossLoggingHelper.tracker["loss_values"].clone()
    MTPLossLoggingHelper.tracker.clear()
    MTPLossLoggingHelper.tracker.update(earlier)
    return hidden.grad.chunk(1 + MTP_LAYERS, dim=0)[1:], logged


def _rank(rank: int, cp: int, port: int, out: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_model

    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_step import mtp_loss_over_context_parallel_patched
    from mimo_v2_flash.runtime.cpu_adaptations import cpu_runtime
    from mimo_v2_flash.runtime.process_groups import initialize_parallel_state, shutdown_parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(cp), RANK=str(rank))
    os.environ["LOCAL_RANK"] = str(rank)
    with cpu_runtime():
        initialize_parallel_state(cp=cp)
        data = _inputs(cp)
        local = {"hidden": torch.cat([_split(part, 0, cp, rank) for part in data["hidden"].chunk(1 + MTP_LAYERS)])}
        local |= {"labels": _split(data["labels"], 1, cp, rank), "loss_mask": _split(data["loss_mask"], 1, cp, rank)}
        local["weight"] = data["weight"]
        with mtp_loss_over_context_parallel_patched():
            grads, logged = _mtp_loss(gpt_model.process_mtp_loss, local, parallel_state.get_context_parallel_group())
        torch.save({"grads": grads, "logged": logged}, out / f"rank{rank}.pt")
        shutdown_parallel_state()


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: middle ranks too
def test_context_parallel_mtp_loss_is_one_process_loss(cp, parallel_state, tmp_path):
    skip_unless_ranks_fit(cp)
    from megatron.core.models.gpt import gpt_model

    upstream = gpt_model.process_mtp_loss
    want_grads, want_logged = _mtp_loss(upstream, _inputs(cp), None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(cp, port, tmp_path), nprocs=cp, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(cp)]
    for layer in range(MTP_LAYERS):
        got = _unsplit([result["grads"][layer] for result in ranks], dim=0)
        assert want_grads[layer].abs().max() > 1e-3  # the loss reaches this layer
        torch.testing.assert_close(got, want_grads[layer], rtol=1e-5, atol=1e-7)
    for result in ranks:
        torch.testing.assert_close(result["logged"], want_logged, rtol=1e-5, atol=1e-7)
    assert gpt_model.process_mtp_loss is upstream
