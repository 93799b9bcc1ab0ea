"""benchmarks/distributed_step_time.py runs on 2 gloo ranks and prints one row per mode (a tiny configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_step_time.py"


def test_prints_one_row_per_mode_with_ratios_to_the_first():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--world", "2", "--width", "8", "--layers", "1", "--micro-batch", "2",
         "--accumulation", "2", "--rounds", "2", "--warmup", "1", "--precondition-frequency", "1"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "+" in line]
    assert [row[0].strip() for row in rows] == ["ddp+soap", "ddp+mlfop", "ddp+soap+shard_refresh",
                                                "ddp+mlfop+shard_refresh", "fsdp2+soap", "fsdp2+mlfop"]
    for mode, accumulate, step, mean, total, *ratios in (map(str.strip, row) for row in rows):
        assert float(accumulate) > 0 and float(step) > 0 and float(mean) > 0 and float(total) > 0
        if mode == "ddp+soap":
            assert [float(r) for r in ratios] == [1.0, 1.0, 1.0]
