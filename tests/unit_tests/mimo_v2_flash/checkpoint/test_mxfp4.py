"""MXFP4 codec: decoding bit for bit against a per-nibble reference written from the OCP MX spec, quantization
against a per-element reference, and the exact conditions under which decode -> encode gives back the bytes."""

from __future__ import annotations

import math

import pytest
import torch
from mxfp4_reference import (
    E2M1_GRID,
    e2m1_from_bits,
    reference_decode,
    reference_quantize,
)

from mimo_v2_flash.checkpoint.mxfp4 import (
    E2M1_VALUES,
    MXFP4_BLOCK_SIZE,
    SCALE_RULES,
    block_is_exact,
    dequantize_mxfp4,
    encode_mxfp4,
    exponent_is_recoverable,
    is_mxfp4_checkpoint,
    mxfp4_scales,
    quantize_mxfp4,
    scale_name,
)

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def top_magnitude_code(packed: torch.Tensor) -> list[list[int]]:
    """Largest (code & 7) of every 16-byte block, by loops."""
    out = []
    for row in packed.reshape(-1, packed.shape[-1]).tolist():
        out.append([max(max(b & 7, b >> 4 & 7) for b in row[i : i + 16]) for i in range(0, len(row), 16)])
    return out


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    view = INT_VIEW[actual.dtype]
    assert torch.equal(actual.view(view), expected.view(view))  # also tells -0.0 from 0.0


def checkpoint_like(rows: int, cols: int, seed: int, max_scale: int = 252) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 with every kind of block: capped magnitudes 0..7 (0 = signed zeros) and scale 0 in places."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols // 32, 32), generator=gen, dtype=torch.uint8)
    cap = torch.randint(0, 8, (rows, cols // 32, 1), generator=gen, dtype=torch.uint8)
    codes = torch.minimum(codes & 7, cap) | (codes & 8)
    scales = torch.randint(0, max_scale + 1, (rows, cols // 32), generator=gen, dtype=torch.uint8)
    scales[torch.rand(scales.shape, generator=gen) < 0.1] = 0
    codes = codes.reshape(rows, cols)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scales


# ----------------------------------------------------------------------------------------------------------------
# Format facts
# ----------------------------------------------------------------------------------------------------------------


def test_constants_follow_the_spec():
    assert MXFP4_BLOCK_SIZE == 32
    assert [math.copysign(1, v) for v in E2M1_VALUES] == [math.copysign(1, e2m1_from_bits(c)) for c in range(16)]
    assert list(E2M1_VALUES) == [e2m1_from_bits(c) for c in range(16)]
    assert [e2m1_from_bits(c) for c in range(8)] == list(E2M1_GRID)


def test_hand_written_bytes_decode_low_nibble_first():
    packed = torch.zeros(2, 32, dtype=torch.uint8)
    packed[0, :3] = torch.tensor([0xF7, 0x1E, 0x80], dtype=torch.uint8)
    packed[0, 16] = 0x52  # second block: 1.0, 3.0
    packed[1, 0] = 0x31  # 0.5, 1.5
    scales = torch.tensor([[128, 126], [0, 255]], dtype=torch.uint8)
    out = dequantize_mxfp4(packed, scales)
    assert out[0, :6].tolist() == [12.0, -12.0, -8.0, 1.0, 0.0, -0.0]
    assert math.copysign(1, out[0, 5].item()) == -1.0  # code 8 is -0
    assert out[0, 32:34].tolist() == [0.5, 1.5]
    assert out[1, :2].tolist() == [2.0**-128, 1.5 * 2.0**-127]  # byte 0 is 2^-127, not zero
    assert torch.isnan(out[1, 32:]).all()  # byte 255 is NaN for the whole block
    assert out.shape == (2, 64) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(24, 128), (2, 3, 64), (96,)])
def test_random_decode_matches_reference_bit_for_bit(dtype, shape):
    rows = math.prod(shape[:-1])
    packed, scales = checkpoint_like(rows, shape[-1], seed=rows + shape[-1])
    packed = packed.reshape(*shape[:-1], shape[-1] // 2)
    scales = scales.reshape(*shape[:-1], shape[-1] // 32)
    expected = reference_decode(packed, scales).to(dtype)
    assert_bits_equal(dequantize_mxfp4(packed, scales, dtype), expected)
    assert_bits_equal(dequantize_mxfp4(packed, scales, dtype, max_chunk_elements=40), expected)


def test_extreme_scales_overflow_to_inf_and_nan_like_the_reference():
    packed, scales = checkpoint_like(16, 64, seed=7)
    scales[:, 0] = torch.arange(240, 256, dtype=torch.uint8)
    packed[13, 0] = 0x77  # 6 * 2^126 overflows float32
    expected = reference_decode(packed, scales).to(torch.float32)
    out = dequantize_mxfp4(packed, scales)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out[15, :32]).all()
    finite = ~torch.isnan(expected)
    assert torch.isinf(expected[finite]).any()
    assert torch.equal(out[finite], expected[finite])


def test_int8_and_e8m0_views_decode_like_uint8():
    packed, scales = checkpoint_like(4, 64, seed=3)
    expected = dequantize_mxfp4(packed, scales)
    assert_bits_equal(dequantize_mxfp4(packed.view(torch.int8), scales.view(torch.float8_e8m0fnu)), expected)


# ----------------------------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------------------------


def tricky_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Normal values over many binades, plus blocks of exact midpoints, zeros, and amax just below a power of two."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    binades = torch.randint(-140, 120, (rows, cols // 32, 1), generator=gen).double()
    weight *= torch.exp2(binades).expand(rows, cols // 32, 32).reshape(rows, cols)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])
    weight[0, :32] = 0.0
    weight[0, 1] = -0.0
    weight[1, :32] = 4.0  # fixes the ocp exponent at 0 ...
    weight[1, 1:15] = midpoints.double()  # ... so these are exact ties
    weight[2, :32] = 1.0 - 2.0**-30  # amax just below a binade
    weight[3, :32] = 7.0  # amax between 6 and 8: saturates under ocp
    weight[3, 1] = 6.5
    return weight


@pytest.mark.parametrize("rule", SCALE_RULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_quantize_matches_the_reference_quantizer(rule, dtype):
    weight = tricky_weight(12, 96, seed=11).to(dtype)
    packed, scales = quantize_mxfp4(weight, rule)
    expected_packed, expected_scales = reference_quantize(weight, rule)
    assert packed.dtype == torch.uint8 and scales.dtype == torch.uint8
    assert packed.tolist() == expected_packed
    assert scales.tolist() == expected_scales
    chunked = quantize_mxfp4(weight, rule, max_chunk_elements=50)
    assert torch.equal(chunked[0], packed) and torch.equal(chunked[1], scales)
    assert torch.equal(mxfp4_scales(weight, rule), scales)
    assert torch.equal(encode_mxfp4(weight, scales), packed)


def test_rules_differ_where_the_sources_say():
    block = torch.zeros(1, 32, dtype=torch.float64)
    block[0, 0] = 3.25  # ocp: 2^-1 (6.5 saturates to 6); even: mantissa 1.625 stays, 2^-1; ceil: 2^0 (3.25 -> 3)
    block[0, 1] = 1.875
    assert [mxfp4_scales(block, rule).item() - 127 for rule in ("ocp", "even", "ceil")] == [-1, -1, 0]
    block[0, 0] = 3.75  # mantissa 1.875 >= 1.75: even moves up a binade
    assert [mxfp4_scales(block, rule).item() - 127 for rule in ("ocp", "even", "ceil")] == [-1, 0, 0]
    assert [quantize_mxfp4(block, rule)[0][0, 0].item() & 0x0F for rule in ("ocp", "even", "ceil")] == [7, 6, 6]


# ----------------------------------------------------------------------------------------------------------------
# decode -> encode
# ----------------------------------------------------------------------------------------------------------------


def expected_recoverable(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The rule, evaluated by loops: largest magnitude code 6 or 7, or scale byte 0 (every block here is exact)."""
    tops = top_magnitude_code(packed)
    return torch.tensor(
        [[top >= 6 or s == 0 for top, s in zip(t, r, strict=True)] for t, r in zip(tops, scales.tolist(), strict=True)]
    )


@pytest.mark.parametrize("rule", SCALE_RULES)
@pytest.mark.parametrize("held", [torch.float32, torch.bfloat16])
def test_decode_then_encode_gives_back_values_always_and_bytes_exactly_where_recoverable(rule, held):
    packed, scales = checkpoint_like(32, 256, seed=5)
    source_values = reference_decode(packed, scales)
    recoverable = expected_recoverable(packed, scales)
    assert 0.2 < recoverable.float().mean().item() < 0.9  # both kinds are present

    new_packed, new_scales = quantize_mxfp4(dequantize_mxfp4(packed, scales, held), rule)

    assert_bits_equal(reference_decode(new_packed, new_scales), source_values)  # every block, signed zeros too
    same_bytes = (new_scales == scales) & (new_packed.view(32, -1, 16) == packed.view(32, -1, 16)).all(dim=-1)
    assert torch.equal(same_bytes, recoverable)
    assert torch.equal(exponent_is_recoverable(packed, scales, held), recoverable)
    assert torch.equal(exponent_is_recoverable(packed, scales, held, max_chunk_elements=100), recoverable)


def test_unrecoverable_blocks_lose_exactly_the_expected_scale_steps():
    # One block per largest magnitude; scale 100. k = 3, 2, 2, 1, 1, 0, 0 for 0.5, 1, 1.5, 2, 3, 4, 6.
    packed = torch.zeros(8, 16, dtype=torch.uint8)
    for top in range(1, 8):
        packed[top, 0] = top | 0x10  # the block's largest magnitude, then a 0.5
    scales = torch.full((8, 1), 100, dtype=torch.uint8)
    _, new_scales = quantize_mxfp4(dequantize_mxfp4(packed, scales))
    assert new_scales.flatten().tolist() == [0, 97, 98, 98, 99, 99, 100, 100]
    _, low = quantize_mxfp4(dequantize_mxfp4(packed, torch.full((8, 1), 1, dtype=torch.uint8)))
    assert low.flatten().tolist() == [0, 0, 0, 0, 0, 0, 1, 1]  # clamped at byte 0


def test_source_scales_reencode_every_exact_block_to_the_same_bytes():
    packed, scales = checkpoint_like(16, 128, seed=9)
    decoded = dequantize_mxfp4(packed, scales, torch.bfloat16)
    assert torch.equal(encode_mxfp4(decoded, scales), packed)
    merged = torch.where(exponent_is_recoverable(packed, scales), mxfp4_scales(decoded), scales)
    assert torch.equal(merged, scales)


def test_exactness_in_narrow_and_wide_dtypes():
    packed = torch.zeros(8, 16, dtype=torch.uint8)
    packed[:, 0] = torch.tensor([0x07, 0x07, 0x06, 0x05, 0x04, 0x03, 0x01, 0x07], dtype=torch.uint8)
    scales = torch.tensor([252, 253, 253, 254, 254, 254, 97, 255], dtype=torch.uint8).view(8, 1)
    # 6*2^125 fits; 6*2^126 and 4*2^126 = 2^128 overflow; 3*2^127 and 2*2^127 overflow; 1.5*2^127 fits.
    assert block_is_exact(packed, scales, torch.float32).flatten().tolist() == [1, 0, 0, 0, 0, 1, 1, 0]
    assert block_is_exact(packed, scales, torch.bfloat16).flatten().tolist() == [1, 0, 0, 0, 0, 1, 1, 0]
    assert block_is_exact(packed, scales, torch.float64).flatten().tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    fp16 = torch.tensor([127, 142, 143, 104, 103], dtype=torch.uint8).view(5, 1)
    codes = torch.tensor([0x07, 0x07, 0x07, 0x01, 0x01], dtype=torch.uint8)
    small = torch.zeros(5, 16, dtype=torch.uint8)
    small[:, 0] = codes
    # 6 fits; 6*2^15 and 6*2^16 exceed 65504; 0.5*2^-23 = 2^-24 is float16's smallest subnormal, 2^-25 is not held.
    assert block_is_exact(small, fp16, torch.float16).flatten().tolist() == [1, 0, 0, 1, 0]
    assert exponent_is_recoverable(packed, scales, torch.float32).flatten().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Errors and names
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "packed_shape,scales_shape",
    [((4, 16), (4, 2)), ((4, 32), (3, 2)), ((4, 24), (4, 2)), ((2, 4, 16), (8, 1)), ((4, 16), (4,))],
)
def test_shapes_that_do_not_fit_are_one_line_errors(packed_shape, scales_shape):
    packed = torch.zeros(packed_shape, dtype=torch.uint8)
    scales = torch.zeros(scales_shape, dtype=torch.uint8)
    for call in (dequantize_mxfp4, block_is_exact, exponent_is_recoverable):
        with pytest.raises(ValueError) as info:
            call(packed, scales)
        message = str(info.value)
        assert "\n" not in message and str(packed_shape) in message and str(scales_shape) in message


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"\(4, 48\)"):
        quantize_mxfp4(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="do not fit"):
        encode_mxfp4(torch.zeros(4, 64), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        encode_mxfp4(torch.zeros(1, 32), torch.full((1, 1), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="Inf or NaN"):
        quantize_mxfp4(torch.tensor([[math.inf] + [0.0] * 31]))
    with pytest.raises(ValueError, match="rule"):
        quantize_mxfp4(torch.zeros(1, 32), "nearest")
    with pytest.raises(TypeError):
        dequantize_mxfp4(torch.zeros(1, 16), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(TypeError):
        quantize_mxfp4(torch.zeros(1, 32, dtype=torch.uint8))


def test_names_and_config_marker():
    assert (
        scale_name("model.layers.1.mlp.experts.7.down_proj.weight")
        == "model.layers.1.mlp.experts.7.down_proj.weight_scale"
    )
    published = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "mxfp4_block_size": 32,
        "quant_method": "fp8",
        "store_dtype": "mxfp4",
        "weight_block_size": [128, 128],
    }
    assert is_mxfp4_checkpoint(published)
    assert not is_mxfp4_checkpoint({**published, "store_dtype": "fp8"})
    assert not is_mxfp4_checkpoint({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert not is_mxfp4_checkpoint(None)
