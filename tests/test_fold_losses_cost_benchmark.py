"""benchmarks/fold_losses_cost.py runs and prints its table (a tiny configuration)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fold_losses_cost.py"


def test_prints_one_row_per_route_with_ratios(capsys):
    spec = importlib.util.spec_from_file_location("fold_losses_cost", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--streams", "2", "3", "--steps", "1", "--warmup", "1", "--hidden", "16", "--layers", "1",
                "--seq", "8", "--micro-batch", "4", "--accumulation", "2"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 ") or
            line.startswith("| 3 ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(k, route) for k in "23" for route in bench.ROUTES]
    for k, route, accumulate, step, total, ratio, versus_one in (map(str.strip, r) for r in rows):
        assert float(accumulate) > 0 and float(versus_one) > 0
        if route == "sampler":
            assert float(ratio) == 1.0
        if route == "one_backward":
            assert total == ratio == "" and float(versus_one) == 1.0
