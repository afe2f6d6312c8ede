"""Exact block-wise FP8 (``float8_e4m3fn`` + ``<name>_scale_inv``) dequantization for MiMo-V2-Flash checkpoints.

``value = fp8.float() * scale_inv[block]`` in fp32, cast once to the target dtype. Which scale a weight row
uses depends on how the checkpoint was quantized; two layouts are known and each is handled exactly:

* ``grid``: rows and columns cut into ``weight_block_size`` blocks from 0 (``ceil(rows / bm)`` scale rows,
  the last block possibly partial);
* ``fused_kv``: K and V of each KV head were quantized as one ``[dk + dv, cols]`` matrix, so per head K uses
  ``ceil(dk / bm)`` scale rows, V the blocks from ``dk // bm`` to ``(dk + dv - 1) // bm``, and when ``dk`` is not
  a multiple of ``bm`` one block (one scale) is shared by the end of K and the start of V. The released
  checkpoint's full-attention ``k_proj [768, 4096]`` with scale ``[8, 32]`` is this layout (dk 192, dv 128).

The layout is chosen from the shapes and confirmed from the data: the shared block of head ``h`` must carry
the same scale in K and in V, and where two layouts fit the shapes but assign scales differently, the one in
which every block reaches the FP8 maximum (amax scaling) wins. A layout nothing explains is an error naming the
tensor and both shapes; block sizes are never guessed from ``rows // scale_rows``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.bridge.models.mimo_v2_flash.hf_checkpoint import CheckpointError, HFCheckpoint
from megatron.bridge.models.mimo_v2_flash.reused_memory import RecycledStorages, ScratchBuffers

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
SCALE_SUFFIX = "_scale_inv"
HALF_EXPONENT_SHIFT = 8  # float16's exponent bias 15 minus float8_e4m3fn's 7
FP8_MAX_SCALED = FP8_MAX * 2.0**-HALF_EXPONENT_SHIFT


_SCRATCH = ScratchBuffers()


@dataclass(frozen=True)
class ScaleLayout:
    """How the rows of one weight map to rows of its scale tensor."""

    kind: str
    row_to_scale_row: torch.Tensor
    evidence: str


def grid_row_map(rows: int, block: int) -> torch.Tensor:
    return torch.arange(rows) // block


def fused_kv_row_map(which: str, num_heads: int, dk: int, dv: int, block: int) -> torch.Tensor:
    """Scale row of each K (``which='k'``) or V row when K|V of every head were quantized fused."""
    k_blocks = (dk - 1) // block + 1
    v_first, v_last = dk // block, (dk + dv - 1) // block
    if which == "k":
        rows = torch.arange(dk)
        return torch.cat([h * k_blocks + rows // block for h in range(num_heads)])
    rows = torch.arange(dv)
    return torch.cat([h * (v_last - v_first + 1) + (dk + rows) // block - v_first for h in range(num_heads)])


def expand_scale(scale: torch.Tensor, row_map: torch.Tensor, cols: int, col_block: int) -> torch.Tensor:
    """Per-element fp32 scale ``[rows, cols]`` from a block scale tensor."""
    return scale.float()[row_map][:, torch.arange(cols) // col_block]


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, layout: ScaleLayout, col_block: int, out: torch.Tensor
) -> torch.Tensor:
    """Exact dequantization into ``out`` (contiguous, ``weight``'s element count): fp32 product, one cast to its dtype.

    Rows sharing a scale row form runs (one per row block); each run is one broadcast multiply by that scale row
    expanded over its column blocks, so fp32 temporaries stay one block-row high.
    """
    rows, cols = weight.shape
    out = out.view(rows, cols)
    column_scales = scale.float().repeat_interleave(col_block, dim=1)[:, :cols]
    # PyTorch's float8 -> float32 cast is scalar code; the float16 route below is vectorized (about 3x faster).
    # It yields fp8 * 2**-8, so the scales absorb 2**8: a power-of-two factor, exact while the scales stay finite.
    shifted_scales = column_scales * 2.0**HALF_EXPONENT_SHIFT
    fast = bool(torch.isfinite(shifted_scales).all())
    row_map = layout.row_to_scale_row
    starts = [0, *(torch.nonzero(row_map[1:] != row_map[:-1]).flatten() + 1).tolist()]
    stops = [*starts[1:], rows]
    # One set of temporaries for all runs: allocating them per run page-faults fresh memory every time.
    run_rows = max(stop - start for start, stop in zip(starts, stops, strict=True))
    bits = _SCRATCH.get("fp8 bits", run_rows * cols, torch.int16).view(run_rows, cols) if fast else None
    values = _SCRATCH.get("fp32 run", run_rows * cols, torch.float32).view(run_rows, cols)
    for start, stop in zip(starts, stops, strict=True):
        run = values[: stop - start]
        if fast and _fp8_as_scaled_float(weight[start:stop], bits[: stop - start], run):
            run_scales = shifted_scales[int(row_map[start])]
        else:
            run.copy_(weight[start:stop])
            run_scales = column_scales[int(row_map[start])]
        # The fp32 product, cast once. (``torch.mul(..., out=<bf16>)`` would allocate an fp32 temporary per run.)
        out[start:stop].copy_(run.mul_(run_scales))
    return out


def _fp8_as_scaled_float(weight: torch.Tensor, bits: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = weight.float() * 2**-8`` exactly (``bits``: int16 workspace); False if ``weight`` holds NaN.

    The fp8 bits shifted left by 7 are a float16 with the same sign, exponent field and mantissa (subnormals
    included); only the exponent bias differs. Sign extension of the int8 view puts the sign in bit 15 and also
    in bit 14, which is cleared. float8_e4m3fn has no infinities and one NaN pattern per sign (exponent and
    mantissa all ones), which lands on +-1.875, beyond the largest finite value 448 * 2**-8 = 1.75.
    """
    bits.copy_(weight.view(torch.int8)).bitwise_left_shift_(7).bitwise_and_(~0x4000)
    out.copy_(bits.view(torch.float16))
    low, high = torch.aminmax(out)
    return bool(high <= FP8_MAX_SCALED) and bool(low >= -FP8_MAX_SCALED)


def block_amax(weight: torch.Tensor, row_map: torch.Tensor, col_block: int, num_scale_rows: int) -> torch.Tensor:
    """Largest |value| of every scale block ``[scale_rows, col_blocks]`` under a row map."""
    col_map = torch.arange(weight.shape[1]) // col_block
    col_blocks = int(col_map.max()) + 1
    block_ids = row_map[:, None] * col_blocks + col_map[None, :]
    flat = torch.zeros(num_scale_rows * col_blocks).scatter_reduce(
        0, block_ids.flatten(), weight.float().abs().flatten(), reduce="amax"
    )
    return flat.view(num_scale_rows, col_blocks)


class FP8Checkpoint:
    """Dequantizing view of an :class:`HFCheckpoint`: weights come out in a float dtype, scales are hidden."""

    def __init__(self, checkpoint: HFCheckpoint) -> None:
        self.checkpoint = checkpoint
        config = checkpoint.config
        quant = config.get("quantization_config") or {}
        self.block = tuple(quant["weight_block_size"]) if quant.get("weight_block_size") else None
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        self.v_head_dim = int(config.get("v_head_dim") or self.head_dim)
        self._layouts: dict[str, ScaleLayout] = {}
        self._recycled = RecycledStorages()
        self._check_pairs()

    @property
    def is_fp8(self) -> bool:
        return any(self.checkpoint.dtype(n) == FP8_DTYPE for n in self.checkpoint.keys())

    def _check_pairs(self) -> None:
        names = set(self.checkpoint.keys())
        for name in sorted(names):
            if name.endswith(SCALE_SUFFIX):
                if name[: -len(SCALE_SUFFIX)] not in names:
                    raise CheckpointError(f"{self.checkpoint.file_of(name)}: scale {name} has no weight")
            elif self.checkpoint.dtype(name) == FP8_DTYPE:
                if name + SCALE_SUFFIX not in names:
                    raise CheckpointError(f"{self.checkpoint.file_of(name)}: FP8 weight {name} has no {SCALE_SUFFIX}")
                if self.block is None:
                    raise CheckpointError(
                        f"{self.checkpoint.directory / 'config.json'}: FP8 weights (e.g. {name}) but no "
                        "quantization_config.weight_block_size"
                    )
                if len(self.checkpoint.shape(name)) != 2:
                    raise CheckpointError(f"{self.checkpoint.file_of(name)}: FP8 weight {name} is not 2-D")

    def weight_names(self) -> list[str]:
        return [n for n in self.checkpoint.keys() if not n.endswith(SCALE_SUFFIX)]

    def result_dtype(self, name: str, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype :meth:`get` returns for ``name``: ``dtype`` if given, else fp32 for FP8, else as stored."""
        if dtype is not None:
            return dtype
        return torch.float32 if self.checkpoint.dtype(name) == FP8_DTYPE else self.checkpoint.dtype(name)

    def get(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, dequantized exactly if FP8, in :meth:`result_dtype` (into contiguous ``out`` if given).

        Without ``out``, it lands in memory recycled from earlier tensors that are no longer referenced (see
        :class:`RecycledStorages`).
        """
        shape, result = self.checkpoint.shape(name), self.result_dtype(name, dtype)
        if out is None:
            out = self._recycled.empty(tuple(shape), result)
        elif out.dtype != result or out.numel() != math.prod(shape) or not out.is_contiguous():
            raise ValueError(f"{name}: out must be a contiguous {result} tensor of shape {tuple(shape)}")
        stored = self.checkpoint.dtype(name)
        if stored == result:
            return self.checkpoint.get(name, out.reshape(-1).view(torch.uint8))
        # Read bytes only feed the dequantization or cast below, so they go to a reused buffer.
        tensor = self.checkpoint.get(name, _SCRATCH.get("read", self.checkpoint.nbytes(name), torch.uint8))
        if stored != FP8_DTYPE:
            return out.view(shape).copy_(tensor)
        scale = self.checkpoint.get(name + SCALE_SUFFIX)
        return dequantize(tensor, scale, self.layout(name), self.block[1], out)

    def stackable(self, names: list[str], dtypes: list[torch.dtype | None]) -> bool:
        """Whether :meth:`get_stacked` can read these: 2-D, one width, one result dtype."""
        shapes = [self.checkpoint.shape(name) for name in names]
        results = {self.result_dtype(name, dtype) for name, dtype in zip(names, dtypes, strict=True)}
        return all(len(shape) == 2 for shape in shapes) and len({s[1] for s in shapes}) == 1 and len(results) == 1

    def get_stacked(self, names: list[str], dtypes: list[torch.dtype | None]) -> list[torch.Tensor]:
        """Weights of one width read (FP8: dequantized) into consecutive rows of one tensor; returns its row blocks.

        A gated MLP's gate and up weights read this way already form ``[gate; up]``, so mapping them needs no copy.
        """
        if not self.stackable(names, dtypes):
            shapes = [self.checkpoint.shape(name) for name in names]
            raise ValueError(f"get_stacked: {names} are not 2-D weights of one width and dtype: {shapes}")
        rows = [self.checkpoint.shape(name)[0] for name in names]
        width = self.checkpoint.shape(names[0])[1]
        stacked = self._recycled.empty((sum(rows), width), self.result_dtype(names[0], dtypes[0]))
        parts = stacked.split(rows)
        return [self.get(n, d, out=part) for n, d, part in zip(names, dtypes, parts, strict=True)]

    def layout(self, name: str) -> ScaleLayout:
        if name not in self._layouts:
            self._layouts[name] = self._detect(name)
        return self._layouts[name]

    def _candidates(self, name: str) -> dict[str, torch.Tensor]:
        rows, cols = self.checkpoint.shape(name)
        scale_rows, scale_cols = self.checkpoint.shape(name + SCALE_SUFFIX)
        bm, bn = self.block
        if scale_cols != math.ceil(cols / bn):
            raise CheckpointError(
                self._unexplained(name, f"scale has {scale_cols} column blocks, expected {math.ceil(cols / bn)}")
            )
        candidates = {}
        if scale_rows == math.ceil(rows / bm):
            candidates["grid"] = grid_row_map(rows, bm)
        which = (
            "k"
            if name.endswith("self_attn.k_proj.weight")
            else "v"
            if name.endswith("self_attn.v_proj.weight")
            else None
        )
        head = self.head_dim if which == "k" else self.v_head_dim
        if which and rows % head == 0:
            heads = rows // head
            row_map = fused_kv_row_map(which, heads, self.head_dim, self.v_head_dim, bm)
            if int(row_map.max()) + 1 == scale_rows:
                candidates["fused_kv"] = row_map
        return candidates

    def _unexplained(self, name: str, why: str) -> str:
        return (
            f"{self.checkpoint.file_of(name)}: cannot explain the FP8 scale layout of {name}: weight "
            f"{self.checkpoint.shape(name)}, scale {self.checkpoint.shape(name + SCALE_SUFFIX)}, "
            f"block {self.block} ({why})"
        )

    def shared_scale_check(self, k_name: str) -> tuple[int, int] | None:
        """For a k_proj: (heads whose shared K|V block has equal scales, heads checked); None if not applicable."""
        bm = self.block[0]
        v_name = k_name.replace("k_proj.weight", "v_proj.weight")
        if self.head_dim % bm == 0 or v_name + SCALE_SUFFIX not in self.checkpoint:
            return None
        heads = self.checkpoint.shape(k_name)[0] // self.head_dim
        k_scale, v_scale = self.checkpoint.get(k_name + SCALE_SUFFIX), self.checkpoint.get(v_name + SCALE_SUFFIX)
        k_per_head = (self.head_dim - 1) // bm + 1
        v_per_head = (self.head_dim + self.v_head_dim - 1) // bm - self.head_dim // bm + 1
        if k_scale.shape[0] != heads * k_per_head or v_scale.shape[0] != heads * v_per_head:
            return 0, heads
        equal = sum(
            bool(torch.equal(k_scale[h * k_per_head + k_per_head - 1], v_scale[h * v_per_head])) for h in range(heads)
        )
        return equal, heads

    def _fused_amax_fraction(self, k_name: str) -> float:
        """Fraction of fused K|V blocks (shared blocks counted once over both parts) reaching the FP8 max."""
        v_name = k_name.replace("k_proj.weight", "v_proj.weight")
        if v_name not in self.checkpoint or self.checkpoint.dtype(v_name) != FP8_DTYPE:
            return 0.0
        bm, bn = self.block
        heads = self.checkpoint.shape(k_name)[0] // self.head_dim
        maxima = []
        for which, part in (("k", k_name), ("v", v_name)):
            row_map = fused_kv_row_map(which, heads, self.head_dim, self.v_head_dim, bm)
            scale_rows = self.checkpoint.shape(part + SCALE_SUFFIX)[0]
            if int(row_map.max()) + 1 != scale_rows:
                return 0.0
            maxima.append(block_amax(self.checkpoint.get(part), row_map, bn, scale_rows))
        k_per_head = (self.head_dim - 1) // bm + 1
        v_per_head = (self.head_dim + self.v_head_dim - 1) // bm - self.head_dim // bm + 1
        return _fused_amax_fraction_impl(*maxima, heads, k_per_head, v_per_head, self.head_dim % bm != 0)

    def _detect(self, name: str) -> ScaleLayout:
        candidates = self._candidates(name)
        if not candidates:
            raise CheckpointError(self._unexplained(name, "neither the block grid nor the fused K|V layout fits"))
        k_name = name.replace("v_proj.weight", "k_proj.weight")
        shared = self.shared_scale_check(k_name) if "fused_kv" in candidates else None
        if shared is not None and shared[0] != shared[1] and "grid" not in candidates:
            raise CheckpointError(
                self._unexplained(
                    name, f"shapes fit the fused K|V layout but only {shared[0]}/{shared[1]} heads share the K|V scale"
                )
            )
        if len(candidates) == 1 or torch.equal(*candidates.values()):
            kind = "fused_kv" if "fused_kv" in candidates and "grid" not in candidates else "grid"
            evidence = f"scale rows fit '{kind}' only" if len(candidates) == 1 else "grid and fused K|V coincide"
            if shared is not None:
                evidence += f"; K|V shared-block scales equal for {shared[0]}/{shared[1]} heads"
            return ScaleLayout(kind, candidates[kind] if kind in candidates else candidates["grid"], evidence)
        # Both fit the shapes and assign scales differently: decide from the data (amax scaling puts the FP8
        # maximum in every block; a fused block's maximum may sit in either its K or its V part).
        weight = self.checkpoint.get(name)
        scale_rows = self.checkpoint.shape(name + SCALE_SUFFIX)[0]
        fractions = {
            "grid": float(
                (block_amax(weight, candidates["grid"], self.block[1], scale_rows) == FP8_MAX).float().mean()
            )
        }
        fractions["fused_kv"] = self._fused_amax_fraction(k_name)
        winners = [kind for kind, fraction in fractions.items() if fraction == 1.0]
        if shared is not None and shared[0] != shared[1]:
            winners = [kind for kind in winners if kind != "fused_kv"]
        if len(winners) != 1:
            raise CheckpointError(self._unexplained(name, f"ambiguous: blocks at FP8 max per layout {fractions}"))
        evidence = f"ambiguous shapes; every block reaches the FP8 max only under '{winners[0]}' ({fractions})"
        return ScaleLayout(winners[0], candidates[winners[0]], evidence)


def _fused_amax_fraction_impl(k_max, v_max, heads, k_per_head, v_per_head, shared):
    if shared:
        for h in range(heads):
            joint = torch.maximum(k_max[h * k_per_head + k_per_head - 1], v_max[h * v_per_head])
            k_max[h * k_per_head + k_per_head - 1] = joint
            v_max[h * v_per_head] = joint
    return float((torch.cat([k_max, v_max]) == FP8_MAX).float().mean())


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax-scaled block FP8 quantization on the plain grid (how checkpoints are produced; used for fixtures)."""
    bm, bn = block
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn))
    quantized = torch.empty(rows, cols, dtype=FP8_DTYPE)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float()
            amax = tile.abs().max().clamp(min=1e-12)
            scale[i, j] = amax / FP8_MAX
            quantized[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (
                (tile / scale[i, j]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            )
    return quantized, scale


def quantize_fused_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int, block: tuple[int, int]):
    """Quantize K and V the way the release did: per KV head, ``[K_h; V_h]`` as one matrix on the grid."""
    dk, dv = k.shape[0] // num_heads, v.shape[0] // num_heads
    qk, sk, qv, sv = [], [], [], []
    bm = block[0]
    for h in range(num_heads):
        fused_q, fused_s = quantize_blockwise(torch.cat([k[h * dk : (h + 1) * dk], v[h * dv : (h + 1) * dv]]), block)
        qk.append(fused_q[:dk])
        qv.append(fused_q[dk:])
        sk.append(fused_s[: (dk - 1) // bm + 1])
        sv.append(fused_s[dk // bm :])
    return torch.cat(qk), torch.cat(sk), torch.cat(qv), torch.cat(sv)
