"""Which serving TP reads FP8 q/k/v exactly: the package's rule model against a loader simulated from vLLM's source.

The simulation (written here, sharing no code with the package) does what vLLM 0.33's ``QKVParallelLinear`` weight
loader and block-FP8 GEMM do per TP rank: narrow each projection's weight and scale at the rank's offset (K/V at
its KV head group's offset when heads are replicated), concatenate them, and dequantize fused row ``i`` with fused
scale row ``i // 128``. A narrow past the stored rows raises, as the server fails.
"""

from __future__ import annotations

import math

import fp8_reference
import pytest
import torch

from mimo_v2_flash.checkpoint.fp8_quantization import quantize_kv
from mimo_v2_flash.checkpoint.fp8_scale_layouts import grid_rows
from mimo_v2_flash.checkpoint.fp8_serving import AttentionGeometry, reads_exactly, serve_kv_layout, serving_tps

BLOCK = (128, 128)
HEADS, DK, DV, COLS = 64, 192, 128, 128  # the release's attention, one column block


def served_weights(q, k, v, tp: int, kv_heads: int) -> list[torch.Tensor]:
    """Per rank, the fused [Q_r; K_r; V_r] weight as the loader dequantizes it (q/k/v: (fp8, scale) pairs)."""
    bm, bn = BLOCK
    replicas = max(1, tp // kv_heads)
    per_rank_kv = max(1, kv_heads // tp)
    sizes = {"q": HEADS // tp * DK, "k": per_rank_kv * DK, "v": per_rank_kv * DV}
    ranks = []
    for rank in range(tp):
        weights, scales = [], []
        for name, (fp8, scale) in zip("qkv", (q, k, v), strict=True):
            index = rank if name == "q" else rank // replicas
            rows, slots = sizes[name], math.ceil(sizes[name] / bm)
            weights.append(fp8.float().narrow(0, index * rows, rows))
            scales.append(scale.narrow(0, index * slots, slots))
        fused, fused_scale = torch.cat(weights), torch.cat(scales)
        per_element = fused_scale.repeat_interleave(bm, 0)[: fused.shape[0]].repeat_interleave(bn, 1)[:, :COLS]
        ranks.append(fused * per_element)
    return ranks


def true_weights(q, k, v, tp: int, kv_heads: int, layout: str) -> list[torch.Tensor]:
    """Per rank, the fused rows dequantized with the checkpoint's own layout (the reference dequantization)."""
    dq = fp8_reference.dequantize_grid(*q, BLOCK)
    dk, dv = fp8_reference.dequantize(k[0], k[1], v[0], v[1], kv_heads, BLOCK, layout)
    replicas, per_rank_kv = max(1, tp // kv_heads), max(1, kv_heads // tp)
    ranks = []
    for rank in range(tp):
        group = rank // replicas
        q_rows = HEADS // tp * DK
        ranks.append(
            torch.cat(
                [
                    dq[rank * q_rows : (rank + 1) * q_rows],
                    dk[group * per_rank_kv * DK : (group + 1) * per_rank_kv * DK],
                    dv[group * per_rank_kv * DV : (group + 1) * per_rank_kv * DV],
                ]
            )
        )
    return ranks


def simulated_verdict(q, k, v, tp: int, kv_heads: int, layout: str) -> bool | str:
    try:
        served = served_weights(q, k, v, tp, kv_heads)
    except RuntimeError:  # narrow past the stored scale rows: the server fails loudly
        return "fails"
    return all(torch.equal(a, b) for a, b in zip(served, true_weights(q, k, v, tp, kv_heads, layout), strict=True))


@pytest.mark.parametrize(("kv_heads", "layout"), [(4, "fused_kv_split"), (8, "grid")])
def test_release_layouts_are_read_exactly_where_the_simulated_loader_reads_them(kv_heads, layout):
    """The release: full layers (4 KV heads) fused_kv_split, SWA layers (8 KV heads) on the grid."""
    gen = torch.Generator().manual_seed(kv_heads)
    q = fp8_reference.quantize_grid(torch.randn(HEADS * DK, COLS, generator=gen), BLOCK)
    k, v = torch.randn(kv_heads * DK, COLS, generator=gen), torch.randn(kv_heads * DV, COLS, generator=gen)
    qk, sk, qv, sv = fp8_reference.quantize(k, v, kv_heads, BLOCK, layout)
    owners_k = fp8_reference.owners(layout, "k", kv_heads, DK, DV, BLOCK[0])
    owners_v = fp8_reference.owners(layout, "v", kv_heads, DK, DV, BLOCK[0])
    sq = q[1].shape[0]

    def index(owner: tuple[str, int]) -> int:
        return sq + (owner[1] if owner[0] == "k" else sk.shape[0] + owner[1])

    row_maps = {
        "q": grid_rows(HEADS * DK, BLOCK[0]),
        "k": torch.tensor([index(o) for o in owners_k]),
        "v": torch.tensor([index(o) for o in owners_v]),
    }
    scales = torch.cat([q[1], sk, sv])
    geometry = AttentionGeometry(HEADS, kv_heads, DK, DV, BLOCK[0])
    verdicts = {}
    for tp in serving_tps(HEADS):
        ours = reads_exactly(geometry, tp, row_maps, scales, (sq, sk.shape[0], sv.shape[0]))
        simulated = simulated_verdict(q, (qk, sk), (qv, sv), tp, kv_heads, layout)
        assert (ours if ours in (True, False) else "fails") == simulated, tp
        verdicts[tp] = simulated
    exact = [tp for tp, verdict in verdicts.items() if verdict is True]
    # The facts gathered from the serving stacks: full layers misread at TP 1-2, SWA layers fail from TP 8.
    assert exact == ([4, 8, 16, 32] if kv_heads == 4 else [1, 2, 4])


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("kv_heads", [2, 4, 8])
def test_the_serve_layout_is_read_exactly_by_the_simulated_loader(tp, kv_heads):
    geometry = AttentionGeometry(HEADS, kv_heads, DK, DV, BLOCK[0])
    layout = serve_kv_layout(geometry, tp)
    gen = torch.Generator().manual_seed(tp * 10 + kv_heads)
    k, v = torch.randn(kv_heads * DK, COLS, generator=gen), torch.randn(kv_heads * DV, COLS, generator=gen)
    qk, sk, qv, sv = quantize_kv(k, v, kv_heads, BLOCK, layout)
    q = fp8_reference.quantize_grid(torch.randn(HEADS * DK, COLS, generator=gen), BLOCK)
    served = served_weights(q, (qk, sk), (qv, sv), tp, kv_heads)
    # What the server computes must be the model's weights to FP8 rounding on every rank (reference: the original).
    replicas, per_rank_kv = max(1, tp // kv_heads), max(1, kv_heads // tp)
    for rank, fused in enumerate(served):
        group = rank // replicas
        want_k = k[group * per_rank_kv * DK : (group + 1) * per_rank_kv * DK]
        want_v = v[group * per_rank_kv * DV : (group + 1) * per_rank_kv * DV]
        got_k = fused[HEADS // tp * DK :][: want_k.shape[0]]
        got_v = fused[HEADS // tp * DK + want_k.shape[0] :]
        for got, want in ((got_k, want_k), (got_v, want_v)):
            # Amax scaling: each element within half an FP8 step (2^-4 relative to its block's amax at most).
            assert ((got - want).abs() <= want.abs().max() * 2**-4).all()
        # Every block the server reads holds |fp8| = 448: the server's blocks are the quantizer's own.
        fp8_rows = torch.cat(
            [
                q[0].narrow(0, rank * (HEADS // tp * DK), HEADS // tp * DK).float(),
                *(t.float().narrow(0, group * per_rank_kv * d, per_rank_kv * d) for t, d in ((qk, DK), (qv, DV))),
            ]
        )
        block_max = fp8_rows.abs().view(-1, COLS).split(BLOCK[0])
        assert all(b.max() == 448 for b in block_max), rank
