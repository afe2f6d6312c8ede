"""Exact MXFP4 codec for the routed experts of MiMo-V2.6-Flash (``uint8`` E2M1 pairs + ``uint8`` E8M0 scales).

Facts, with their public sources (checked there; none of their code is copied here):

* **Config marker.** ``quantization_config`` keeps ``"quant_method": "fp8"`` (dense linears stay block FP8
  E4M3 with ``<name>_scale_inv`` over ``weight_block_size`` [128, 128]) and adds ``"store_dtype": "mxfp4"`` and
  ``"mxfp4_block_size": 32``; ``"fmt": "e4m3"``, ``"activation_scheme": "dynamic"`` and ``ignored_layers`` (the
  BF16 ``o_proj`` modules) are as before. ``quant_method == "fp8" and store_dtype == "mxfp4"`` is the test every
  reader uses: HF ``XiaomiMiMo/MiMo-V2.6-Flash-RL`` config.json (as quoted by third-party tooling); radixark/miles
  ``tools/convert_mimo_v2_to_bf16.py`` and its ``quantizer_fp8_mxfp4`` weight-sync test; sglang's
  ``is_mimo_v2_mxfp4`` test and PRs #27946, #36508, #40448; vLLM PR #57784 ("mxfp4 MoE for MiMo V2"); the
  unmerged Megatron-Bridge ``MiMoV2Bridge`` unit test.
* **Tensor names.** Only routed experts are MXFP4: ``model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight``
  (safetensors ``U8``) with the scale beside it as ``<weight name>_scale``, i.e. ``....weight_scale`` (``U8``),
  not ``_scale_inv`` (that suffix stays with the FP8 linears): miles ``convert_mimo_v2_to_bf16.py`` ("experts use
  ``weight_scale``") and ``quantizer_fp8_mxfp4.py``; ``MiMoV2Bridge`` (``f"{hf_param}_scale"``); sglang #36508
  (maps the checkpoint's ``weight_scale`` onto its ``weight_scale_inv`` parameter). Dense layer 0 and the dense
  MTP layers in ``model_mtp.safetensors`` are not MXFP4; there are no shared experts (``n_shared_experts`` null).
* **Shapes** (hidden 4096, ``moe_intermediate_size`` 2048): ``gate_proj``/``up_proj`` packed ``[2048, 2048]`` with
  scales ``[2048, 128]``; ``down_proj`` packed ``[4096, 1024]`` with scales ``[4096, 64]``: packed ``[R, C/2]``,
  scales ``[R, C/32]`` for a logical ``[R, C]`` weight, blocks running along the input (last) dimension. Check:
  the published header totals, 160,859,947,008 ``U8`` bytes in 36,096 ``U8`` weights with a ``_scale``
  companion, are exactly 47 MoE layers x 256 experts x (3 weights; 2 x (2048x2048 + 2048x128) + 4096x1024 +
  4096x64 bytes).
* **Nibble order.** Byte ``j`` of a row holds column ``2j`` in its low nibble and column ``2j + 1`` in its high
  nibble (miles ``dequant_mxfp4``; the ``MiMoV2Bridge`` test decodes byte ``0xF7`` as ``[6, -6]``).
* **E2M1 element** (OCP Microscaling Formats v1.0, FP4 E2M1): bit 3 sign, bits 2-1 exponent (bias 1), bit 0
  mantissa; exponent 0 is subnormal (``0.5 * m``); no Inf or NaN. Codes 0-7: 0, 0.5, 1, 1.5, 2, 3, 4, 6; codes
  8-15 the same negated (code 8 is -0).
* **E8M0 scale** (same spec): one unsigned biased exponent per 32 elements, value ``2^(e - 127)`` for ``e`` in
  0..254 (``e = 0`` is 2^-127, not zero) and NaN for 255, which makes the whole block NaN. Several readers treat
  0 as zero or 255 as 2^128; this module follows the spec.
* **Shared-exponent rule.** The spec's (OCP MX v1.0, section 6.3): ``X = 2^(floor(log2(amax)) - 2)`` (2 is E2M1's
  largest element exponent), elements rounded to nearest-even onto E2M1 and saturated at +-6. Variants in public
  code: ``"even"`` (AMD Quark, vLLM ``tests/quantization/reference_mxfp4.py``) first rounds amax's mantissa to one
  bit; ``"ceil"`` (miles ``quantize_mxfp4``, ``MiMoV2Bridge``'s re-quantizer) takes ``ceil(log2(amax / 6))`` so
  nothing saturates. Xiaomi's own quantizer is not public. miles' test states that every block of the official
  checkpoint has largest code 4 or 6; the ``"ocp"`` and ``"even"`` rules always produce that, ``"ceil"`` does not
  (it gives 3 when ``amax / 2^e`` falls in (3, 3.5)), so ``"ocp"`` is the default. On values decoded from a
  checkpoint the three rules choose the same exponent (their largest magnitude is 1 or 1.5 times a power of two,
  where the rules agree), so the choice matters only for weights changed after import.

When the exponent of a block can not be recovered from its decoded values (:func:`exponent_is_recoverable`):
let a block have scale byte ``s`` and largest element magnitude ``M`` (``M`` in {0, 0.5, 1, 1.5, 2, 3, 4, 6}),
decoded into ``dtype``. If some value ``c * 2^(s-127)`` of the block is not representable in ``dtype`` (``s`` =
255; overflow, for float32/bfloat16 ``M * 2^(s-127) >= 2^128``, i.e. ``s >= 253`` with ``M >= 4`` or ``s = 254``
with ``M >= 2``; for float16 also values below its subnormal grid), the decoded values already differ from the
source and nothing is promised. Otherwise (*exact*) :func:`quantize_mxfp4`, under any of the three rules, returns
``s' = s`` when ``M`` is 4 or 6, ``s' = max(s - k, 0)`` with ``k`` = 1, 2, 3 for ``M`` in {2, 3}, {1, 1.5},
{0.5}, and ``s' = 0`` for an all-zero block. So the bytes come back identical exactly when ``M >= 4`` or
``s == 0``. The values come back identical for every exact block: the codes are multiplied by ``2^(s - s')``
with ``s - s' <= k`` and ``M * 2^k <= 6``, and doubling an E2M1 magnitude that stays <= 6 lands on E2M1 again
(0.5->1->2->4, 1.5->3->6); zeros keep their sign (code 8 re-encodes as 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

MXFP4_BLOCK_SIZE = 32
"""Elements per E8M0 scale, along the last (input) dimension."""
PACKED_BLOCK_BYTES = MXFP4_BLOCK_SIZE // 2
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
"""E2M1 value of each 4-bit code (bit 3 is the sign)."""
E2M1_MAX = 6.0
E2M1_EMAX = 2
"""Exponent of E2M1's largest power of two (4.0): the ``- 2`` of the OCP shared-exponent rule."""
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127
ZERO_BLOCK_SCALE = 0
"""Scale byte :func:`quantize_mxfp4` writes for an all-zero block (2^-127, the clamp of log2(0))."""
RECOVERABLE_MIN_CODE = 6
"""A block's exponent is implied by its values when its largest magnitude code (low 3 bits) is >= 6 (4.0 or 6.0)."""
SCALE_SUFFIX = "_scale"
"""An expert weight ``<name>`` keeps its scales in ``<name>_scale`` (``...weight_scale``)."""
DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Logical elements processed at once: bounds the float64 temporaries to tens of MiB."""

ScaleRule = Literal["ocp", "even", "ceil"]
SCALE_RULES: tuple[str, ...] = ("ocp", "even", "ceil")

# Midpoints between neighbouring E2M1 magnitudes; a tie rounds to the even code, so it goes up where the code below
# is odd (0.75 -> 1, 1.75 -> 2, 3.5 -> 4) and down where it is even (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def scale_name(weight_name: str) -> str:
    """Return the name of the E8M0 scale tensor stored beside an MXFP4 weight.

    Args:
        weight_name: Checkpoint name of the packed weight, e.g. ``model.layers.1.mlp.experts.0.up_proj.weight``.

    Returns:
        ``weight_name + "_scale"``.
    """
    return weight_name + SCALE_SUFFIX


def is_mxfp4_checkpoint(quantization_config: Mapping[str, Any] | None) -> bool:
    """Tell whether a ``quantization_config`` marks FP8 dense weights with MXFP4 routed experts.

    Args:
        quantization_config: The ``quantization_config`` mapping of a ``config.json``, or None.

    Returns:
        True when ``quant_method`` is ``"fp8"`` and ``store_dtype`` is ``"mxfp4"``.
    """
    if not quantization_config:
        return False
    return quantization_config.get("quant_method") == "fp8" and quantization_config.get("store_dtype") == "mxfp4"


def _as_bytes(tensor: torch.Tensor, what: str, allowed: tuple[torch.dtype, ...]) -> torch.Tensor:
    if tensor.dtype not in allowed:
        raise TypeError(f"MXFP4 {what} must be one of {[str(d) for d in allowed]}, got {tensor.dtype}")
    return tensor if tensor.dtype == torch.uint8 else tensor.view(torch.uint8)


def _scale_dtypes() -> tuple[torch.dtype, ...]:
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    return (torch.uint8,) if e8m0 is None else (torch.uint8, e8m0)


def _check_pair(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed = _as_bytes(packed, "packed weight", (torch.uint8, torch.int8))
    scales = _as_bytes(scales, "scales", _scale_dtypes())
    if (
        packed.ndim < 1
        or scales.ndim != packed.ndim
        or packed.shape[:-1] != scales.shape[:-1]
        or packed.shape[-1] != PACKED_BLOCK_BYTES * scales.shape[-1]
    ):
        raise ValueError(
            f"MXFP4 packed {tuple(packed.shape)} and scales {tuple(scales.shape)} do not fit: a logical [..., C] "
            f"weight needs packed [..., C/2] and scales [..., C/{MXFP4_BLOCK_SIZE}] with the same leading dims"
        )
    return packed, scales


def _row_chunks(rows: int, cols: int, max_chunk_elements: int) -> tuple[range, int]:
    if max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements must be positive, got {max_chunk_elements}")
    step = max(1, max_chunk_elements // max(cols, 1))
    return range(0, rows, step), step


def _pow2_f64(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as float64, built from its bits (exact for -1022 <= exponent <= 1023)."""
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


def _decode_f64(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode a [rows, C/2] / [rows, C/32] chunk to float64 [rows, C/32, 32] (exact; NaN where the scale is 255)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], scales.shape[1], -1)
    values = table[codes.long()]
    scale = _pow2_f64(scales.to(torch.int64) - E8M0_BIAS)
    scale = torch.where(scales == E8M0_NAN, torch.full_like(scale, float("nan")), scale)
    return values * scale.unsqueeze(-1)


def dequantize_mxfp4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Decode MXFP4 to ``dtype``: ``out[..., c] = E2M1[code(c)] * 2^(scales[..., c // 32] - 127)``.

    Every product is formed exactly in float64 and cast once, so the result is exact wherever ``dtype`` can hold
    it (always for float32/bfloat16 below 2^128; see :func:`block_is_exact`). Rows are processed in chunks of at
    most ``max_chunk_elements`` logical elements, so the peak beyond the output is bounded.

    Args:
        packed: ``uint8`` (or ``int8``) ``[..., C/2]``; the low nibble of byte ``j`` is column ``2j``.
        scales: ``uint8`` (or ``float8_e8m0fnu``) E8M0 exponents ``[..., C/32]``.
        dtype: Floating dtype of the result.
        max_chunk_elements: Upper bound on the logical elements decoded at once.

    Returns:
        ``[..., C]`` tensor of ``dtype`` on ``packed``'s device; blocks whose scale byte is 255 are NaN.

    Raises:
        TypeError: On a non-byte input or a non-floating ``dtype``.
        ValueError: When the shapes do not fit together.
    """
    packed, scales = _check_pair(packed, scales)
    if not dtype.is_floating_point:
        raise TypeError(f"MXFP4 dequantization needs a floating dtype, got {dtype}")
    lead, cols = packed.shape[:-1], 2 * packed.shape[-1]
    packed2, scales2 = packed.reshape(-1, packed.shape[-1]), scales.reshape(-1, scales.shape[-1])
    rows = packed2.shape[0]
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    starts, step = _row_chunks(rows, cols, max_chunk_elements)
    for r0 in starts:
        r1 = min(r0 + step, rows)
        out[r0:r1] = _decode_f64(packed2[r0:r1], scales2[r0:r1]).view(r1 - r0, cols).to(dtype)
    return out.view(*lead, cols)


def _check_weight(weight: torch.Tensor) -> None:
    if not weight.dtype.is_floating_point:
        raise TypeError(f"MXFP4 quantization needs a floating weight, got {weight.dtype}")
    if weight.ndim < 1 or weight.shape[-1] % MXFP4_BLOCK_SIZE:
        raise ValueError(
            f"MXFP4 weight {tuple(weight.shape)} does not fit: its last dim must be a multiple of {MXFP4_BLOCK_SIZE}"
        )


def _work(chunk: torch.Tensor) -> torch.Tensor:
    """A [rows, C] chunk as float64 [rows, C/32, 32], rejecting Inf/NaN (MXFP4 has no encoding for them)."""
    work = chunk.to(torch.float64).view(chunk.shape[0], -1, MXFP4_BLOCK_SIZE)
    if not bool(torch.isfinite(work).all()):
        raise ValueError("MXFP4 quantization got Inf or NaN values, which E2M1/E8M0 can not encode")
    return work


def _exponents(blocks: torch.Tensor, rule: str) -> torch.Tensor:
    """Unbiased shared exponents (int64) of float64 blocks [rows, nb, 32] under ``rule``."""
    amax = blocks.abs().amax(dim=-1)
    mantissa, exp = torch.frexp(amax)  # amax = mantissa * 2^exp, mantissa in [0.5, 1), exactly
    exp = exp.to(torch.int64)
    shared = exp - 1 - E2M1_EMAX  # floor(log2(amax)) - 2
    if rule == "even":  # amax's mantissa rounded to one bit first: 1.75 and above carries into the next binade
        shared = shared + (mantissa >= 0.875).to(torch.int64)
    elif rule == "ceil":  # smallest e with amax <= 6 * 2^e; 6 * 2^(exp - 3) = 0.75 * 2^exp
        shared = shared + (mantissa > 0.75).to(torch.int64)
    elif rule != "ocp":
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose one of {SCALE_RULES}")
    shared = shared.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    return torch.where(amax == 0, torch.full_like(shared, ZERO_BLOCK_SCALE - E8M0_BIAS), shared)


def _encode_blocks(blocks: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, [rows, nb, 32]) of float64 blocks scaled by 2^-exponent, nearest-even, saturating at 6."""
    normalized = blocks * _pow2_f64(-exponents).unsqueeze(-1)  # exact: a power-of-two multiply within float64
    magnitude = normalized.abs()
    code = torch.zeros(normalized.shape, dtype=torch.uint8, device=blocks.device)
    for index, midpoint in enumerate(_MIDPOINTS):
        code += (magnitude >= midpoint if index % 2 else magnitude > midpoint).to(torch.uint8)
    return code | (torch.signbit(normalized).to(torch.uint8) << 3)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(codes.shape[0], -1)
    return flat[:, 0::2] | (flat[:, 1::2] << 4)


def mxfp4_scales(
    weight: torch.Tensor,
    rule: ScaleRule = "ocp",
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Compute the E8M0 scale byte of every 32-element block of ``weight``.

    Rules (``amax`` = largest magnitude of the block; result clamped to 2^-127..2^127; an all-zero block gets
    :data:`ZERO_BLOCK_SCALE`): ``"ocp"`` ``floor(log2(amax)) - 2``; ``"even"`` the same after rounding amax's
    mantissa to one bit (half up); ``"ceil"`` ``ceil(log2(amax / 6))``. Computed from ``frexp``, so exact.

    Args:
        weight: Floating ``[..., C]`` tensor, ``C`` a multiple of 32, all finite.
        rule: ``"ocp"``, ``"even"`` or ``"ceil"``.
        max_chunk_elements: Upper bound on the elements processed at once.

    Returns:
        ``uint8`` ``[..., C/32]`` biased exponents.

    Raises:
        TypeError: On a non-floating weight.
        ValueError: On a bad shape, an unknown rule, or Inf/NaN values.
    """
    _check_weight(weight)
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose one of {SCALE_RULES}")
    lead, cols = weight.shape[:-1], weight.shape[-1]
    flat = weight.reshape(-1, cols)
    out = torch.empty((flat.shape[0], cols // MXFP4_BLOCK_SIZE), dtype=torch.uint8, device=weight.device)
    starts, step = _row_chunks(flat.shape[0], cols, max_chunk_elements)
    for r0 in starts:
        r1 = min(r0 + step, flat.shape[0])
        out[r0:r1] = (_exponents(_work(flat[r0:r1]), rule) + E8M0_BIAS).to(torch.uint8)
    return out.view(*lead, cols // MXFP4_BLOCK_SIZE)


def encode_mxfp4(
    weight: torch.Tensor,
    scales: torch.Tensor,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Encode ``weight`` onto E2M1 codes under given scale bytes (nearest-even, saturating at +-6, sign kept).

    Use it to re-encode with chosen exponents, e.g. a source checkpoint's scales where
    :func:`exponent_is_recoverable` is False and byte-identical output is wanted.

    Args:
        weight: Floating ``[..., C]`` tensor, ``C`` a multiple of 32, all finite.
        scales: ``uint8`` ``[..., C/32]`` E8M0 bytes in 0..254.
        max_chunk_elements: Upper bound on the elements processed at once.

    Returns:
        ``uint8`` ``[..., C/2]`` packed codes (low nibble = even column).

    Raises:
        TypeError: On a non-floating weight or non-byte scales.
        ValueError: On shapes that do not fit, a NaN scale byte (255), or Inf/NaN values.
    """
    _check_weight(weight)
    scales = _as_bytes(scales, "scales", _scale_dtypes())
    cols = weight.shape[-1]
    if scales.shape != (*weight.shape[:-1], cols // MXFP4_BLOCK_SIZE):
        raise ValueError(
            f"MXFP4 weight {tuple(weight.shape)} and scales {tuple(scales.shape)} do not fit: "
            f"scales must be [..., C/{MXFP4_BLOCK_SIZE}] with the weight's leading dims"
        )
    if bool((scales == E8M0_NAN).any()):
        raise ValueError("MXFP4 encoding got scale byte 255, which is E8M0 NaN")
    flat, flat_scales = weight.reshape(-1, cols), scales.reshape(-1, scales.shape[-1])
    out = torch.empty((flat.shape[0], cols // 2), dtype=torch.uint8, device=weight.device)
    starts, step = _row_chunks(flat.shape[0], cols, max_chunk_elements)
    for r0 in starts:
        r1 = min(r0 + step, flat.shape[0])
        exponents = flat_scales[r0:r1].to(torch.int64) - E8M0_BIAS
        out[r0:r1] = _pack(_encode_blocks(_work(flat[r0:r1]), exponents))
    return out.view(*weight.shape[:-1], cols // 2)


def quantize_mxfp4(
    weight: torch.Tensor,
    rule: ScaleRule = "ocp",
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` to MXFP4: a shared exponent per 32 elements (:func:`mxfp4_scales`), then E2M1 codes.

    For values decoded from an MXFP4 checkpoint the decoded values come back identical for every block that was
    exact in the decoding dtype, and the bytes too where :func:`exponent_is_recoverable` holds (module docstring).

    Args:
        weight: Floating ``[..., C]`` tensor, ``C`` a multiple of 32, all finite.
        rule: Shared-exponent rule, ``"ocp"`` (default), ``"even"`` or ``"ceil"``.
        max_chunk_elements: Upper bound on the elements processed at once.

    Returns:
        ``(packed, scales)``: ``uint8`` ``[..., C/2]`` and ``uint8`` ``[..., C/32]``.

    Raises:
        TypeError: On a non-floating weight.
        ValueError: On a bad shape, an unknown rule, or Inf/NaN values.
    """
    _check_weight(weight)
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose one of {SCALE_RULES}")
    lead, cols = weight.shape[:-1], weight.shape[-1]
    flat = weight.reshape(-1, cols)
    packed = torch.empty((flat.shape[0], cols // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((flat.shape[0], cols // MXFP4_BLOCK_SIZE), dtype=torch.uint8, device=weight.device)
    starts, step = _row_chunks(flat.shape[0], cols, max_chunk_elements)
    for r0 in starts:
        r1 = min(r0 + step, flat.shape[0])
        blocks = _work(flat[r0:r1])
        exponents = _exponents(blocks, rule)
        packed[r0:r1] = _pack(_encode_blocks(blocks, exponents))
        scales[r0:r1] = (exponents + E8M0_BIAS).to(torch.uint8)
    return packed.view(*lead, cols // 2), scales.view(*lead, cols // MXFP4_BLOCK_SIZE)


def block_is_exact(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Tell, per block, whether ``dtype`` holds every decoded value exactly (finite and unrounded).

    False for a NaN scale (255), for overflow (float32/bfloat16: ``M * 2^(s-127) >= 2^128``) and, for narrower
    dtypes such as float16, for values that overflow or fall off its subnormal grid.

    Args:
        packed: ``uint8`` ``[..., C/2]``.
        scales: ``uint8`` ``[..., C/32]``.
        dtype: Floating dtype the values are (or will be) held in.
        max_chunk_elements: Upper bound on the elements processed at once.

    Returns:
        ``bool`` ``[..., C/32]``.

    Raises:
        TypeError: On a non-byte input or a non-floating ``dtype``.
        ValueError: When the shapes do not fit together.
    """
    packed, scales = _check_pair(packed, scales)
    if not dtype.is_floating_point:
        raise TypeError(f"MXFP4 exactness needs a floating dtype, got {dtype}")
    packed2, scales2 = packed.reshape(-1, packed.shape[-1]), scales.reshape(-1, scales.shape[-1])
    out = torch.empty(scales2.shape, dtype=torch.bool, device=packed.device)
    starts, step = _row_chunks(packed2.shape[0], 2 * packed2.shape[1], max_chunk_elements)
    for r0 in starts:
        r1 = min(r0 + step, packed2.shape[0])
        exact = _decode_f64(packed2[r0:r1], scales2[r0:r1])
        held = exact.to(dtype).to(torch.float64)
        out[r0:r1] = (held == exact).all(dim=-1)  # NaN never compares equal
    return out.view(scales.shape)


def exponent_is_recoverable(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Tell, per block, whether decoding to ``dtype`` and :func:`quantize_mxfp4` give back the same bytes.

    True exactly when the block is exact in ``dtype`` (:func:`block_is_exact`) and either its largest magnitude
    code is 6 or 7 (values 4 or 6) or its scale byte is 0. The rule is the same for the ``"ocp"``, ``"even"`` and
    ``"ceil"`` exponent rules. Where it is False but the block is exact, the values still come back identical
    (with a smaller scale byte and doubled codes); see the module docstring for the derivation.

    Args:
        packed: ``uint8`` ``[..., C/2]``.
        scales: ``uint8`` ``[..., C/32]``.
        dtype: Floating dtype the decoded values are held in before re-encoding.
        max_chunk_elements: Upper bound on the elements processed at once.

    Returns:
        ``bool`` ``[..., C/32]``.

    Raises:
        TypeError: On a non-byte input or a non-floating ``dtype``.
        ValueError: When the shapes do not fit together.
    """
    packed, scales = _check_pair(packed, scales)
    nb = scales.shape[-1]
    magnitudes = torch.maximum(packed & 0x07, (packed >> 4) & 0x07)
    top = magnitudes.view(*packed.shape[:-1], nb, PACKED_BLOCK_BYTES).amax(dim=-1)
    implied = (top >= RECOVERABLE_MIN_CODE) | (scales == ZERO_BLOCK_SCALE)
    return implied & block_is_exact(packed, scales, dtype, max_chunk_elements=max_chunk_elements)
