"""Smoke test of benchmarks/step_time.py: a --quick run produces a complete, sane table."""

import importlib.util
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
CONTENDERS = ["adamw", "mlfop_soap", "mlfop_fop_k2", "mlfop_fop_k3", "pytorch_optimizer"]


def load_benchmark():
    """Import the benchmark script as a module from its file path."""
    spec = importlib.util.spec_from_file_location("step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def table_rows(output: str) -> dict[str, list[str]]:
    """Body rows of the Markdown table, keyed by optimizer name."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in CONTENDERS:
            rows[cells[0]] = cells
    return rows


def as_number(cell: str) -> float:
    """A table cell as a float: drops thousands separators and the '(calls)' suffix."""
    return float(cell.split(" (")[0].replace(",", ""))


def test_quick_run_reports_every_contender(capsys):
    benchmark = load_benchmark()

    result = benchmark.main(["--quick", "--optimizers", *CONTENDERS])
    output = capsys.readouterr().out

    assert "load average before" in output and "--quick" in output
    rows = table_rows(output)
    assert sorted(rows) == sorted(CONTENDERS)
    for name, cells in rows.items():
        numbers = [c for c in cells[1:] if not (name == "adamw" and c == "–")]
        assert len(numbers) == (10 if name == "adamw" else 11), cells
        for cell in numbers:
            value = as_number(cell)
            assert math.isfinite(value) and value > 0, (name, cell)
    assert rows["mlfop_soap"][-3:] == ["1.00", "1.00", "1.00"]
    # Both SOAPs see a basis refresh inside the measured window.
    for name in ("mlfop_soap", "mlfop_fop_k2", "mlfop_fop_k3", "pytorch_optimizer"):
        summary = next(row for row in result["summary"] if row["optimizer"] == name)
        assert summary["refresh_calls"], name
