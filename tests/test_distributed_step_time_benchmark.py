"""benchmarks/distributed_step_time.py runs on 2 gloo ranks and prints one row per mode (a tiny configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_step_time.py"


def test_prints_one_row_per_mode_with_ratios_to_the_first():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--world", "2", "--width", "8", "--layers", "1", "--micro-batch", "2",
         "--accumulation", "2", "--rounds", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=180, check=True,
    )
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "+" in line]
    assert [row[0].strip() for row in rows] == ["ddp+soap", "ddp+mlfop", "fsdp2+soap", "fsdp2+mlfop"]
    for mode, accumulate, step, total, step_ratio, total_ratio in (map(str.strip, row) for row in rows):
        assert float(accumulate) > 0 and float(step) > 0 and float(total) > 0
        if mode == "ddp+soap":
            assert float(step_ratio) == float(total_ratio) == 1.0
