"""Reference MXFP4 decoding and quantization for the tests, in plain Python from the OCP Microscaling Formats v1.0
spec (no code shared with the package): E2M1 elements from their bits, E8M0 scales, nibble order low = even column.
"""

from __future__ import annotations

import math

import torch

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX v1.0 FP4 E2M1 magnitudes, by code


def e2m1_from_bits(code: int) -> float:
    """S.EE.M with exponent bias 1; exponent 0 is subnormal (0.M x 2^0)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return math.copysign(magnitude, sign)


def e8m0_from_bits(byte: int) -> float:
    return math.nan if byte == 255 else math.ldexp(1.0, byte - 127)


def reference_decode(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Loop over every byte: low nibble -> column 2j, high nibble -> column 2j + 1; scale of column c is c // 32."""
    rows = packed.reshape(-1, packed.shape[-1]).tolist()
    scale_rows = scales.reshape(-1, scales.shape[-1]).tolist()
    out = []
    for row, scale_row in zip(rows, scale_rows, strict=True):
        values = []
        for j, byte in enumerate(row):
            for column, nibble in ((2 * j, byte & 0x0F), (2 * j + 1, byte >> 4)):
                values.append(e2m1_from_bits(nibble) * e8m0_from_bits(scale_row[column // 32]))
        out.append(values)
    return torch.tensor(out, dtype=torch.float64).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def reference_exponent(amax: float, rule: str) -> int:
    """Unbiased shared exponent by exact search over powers of two (no log2, no frexp)."""
    if amax == 0:
        return -127
    binade = 0  # largest b with 2^b <= amax
    while math.ldexp(1.0, binade) > amax:
        binade -= 1
    while math.ldexp(1.0, binade + 1) <= amax:
        binade += 1
    if rule == "ocp":
        exponent = binade - 2
    elif rule == "even":
        exponent = binade - 2 + (amax / math.ldexp(1.0, binade) >= 1.75)
    else:  # ceil: smallest e with amax <= 6 * 2^e
        exponent = binade - 4
        while 6 * math.ldexp(1.0, exponent) < amax:
            exponent += 1
    return min(max(exponent, -127), 127)


def reference_code(x: float) -> int:
    """Nearest E2M1 magnitude (ties to the even code, beyond 6 saturates), sign bit from x's sign."""
    magnitude = abs(x)
    best = min(range(8), key=lambda code: (abs(E2M1_GRID[code] - magnitude), code % 2))
    return best | (8 if math.copysign(1.0, x) < 0 else 0)


def reference_quantize(weight: torch.Tensor, rule: str) -> tuple[list[list[int]], list[list[int]]]:
    packed, scales = [], []
    for row in weight.to(torch.float64).tolist():
        codes, row_scales = [], []
        for b in range(0, len(row), 32):
            block = row[b : b + 32]
            exponent = reference_exponent(max(abs(v) for v in block), rule)
            row_scales.append(exponent + 127)
            codes += [reference_code(v / math.ldexp(1.0, exponent)) for v in block]
        packed.append([codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(len(codes) // 2)])
        scales.append(row_scales)
    return packed, scales
