"""benchmarks/fp8_quantization.py times every case against both baselines of the same run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks/fp8_quantization.py"


def test_fp8_quantization_benchmark_reports_each_case_against_its_baselines():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "1", "--threads", "1"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = re.findall(r"^(.+?): ([0-9.]+) ms .* plain cast ([0-9.]+) ms \(([0-9.]+) x\)", result.stdout, re.M)
    assert [name for name, *_ in rows] == [
        "expert gate_proj 2048x4096",
        "projection 4096x4096",
        "K 768x4096 + V 512x4096, rank_fused:4",
        "dense gate_proj 16384x4096",
    ]
    for name, ms, cast_ms, ratio in rows:
        ms, cast_ms, ratio = float(ms), float(cast_ms), float(ratio)
        assert ms > 0 and cast_ms > 0, name
        # The printed times are rounded to 0.05 ms, the ratio (of the unrounded times) to 0.005.
        assert abs(ratio - ms / cast_ms) <= ms / cast_ms * (0.05 / ms + 0.05 / cast_ms) + 0.005, name
    assert re.search(r"GiB of FP8 at the expert rate: [0-9.]+ s of quantizing alone", result.stdout)
