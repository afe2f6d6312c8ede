"""benchmarks/context_parallel.py measures under CP 2: every rank reports, and attention's s^2 memory shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks/context_parallel.py"


def test_context_parallel_benchmark_measures_both_ranks(tmp_path):
    out = tmp_path / "cp.json"
    command = [sys.executable, str(SCRIPT), "--seq-lengths", "256", "512", "--cp-sizes", "2", "--json", str(out)]
    # Unbuffered, as CI may run it: print then splits a line's text and newline into two writes, and the ranks'
    # records once ran together on one line of the shared pipe.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = json.loads(out.read_text())["records"]
    peaks = {(r["seq"], r["rank"]): r["peak_bytes"] for r in records}
    assert sorted(peaks) == [(256, 0), (256, 1), (512, 0), (512, 1)]
    for seq in (256, 512):
        # The load-balanced split gives both ranks the same shapes: the same memory within a few percent.
        assert abs(peaks[seq, 0] - peaks[seq, 1]) < 0.05 * peaks[seq, 0], peaks
    # Twice the tokens: more than twice the memory (the [s/2, s] attention scores), at most four times.
    assert 2.2 < peaks[512, 0] / peaks[256, 0] < 4, peaks
    assert "CP2 peak/rank" in result.stdout
