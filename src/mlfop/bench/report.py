"""``mlfop-bench report DIR...``: aggregate finished run folders over seeds into markdown and plots."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

from mlfop.bench.config import BenchError
from mlfop.bench.plots import plot_aggregate
from mlfop.bench.runfolder import RunFolder
from mlfop.bench.summary import aggregate, group_label, markdown_table, setting

__all__ = ["check_report_input", "write_report"]


def check_report_input(directories: list[str], output: str) -> None:
    """Each directory must be a finished run folder; the output folder must be new."""
    for directory in directories:
        if not (Path(directory) / "metrics.jsonl").is_file() or not (Path(directory) / "config.json").is_file():
            raise BenchError(f"{directory} is not a finished mlfop-bench run folder (no metrics.jsonl/config.json); "
                             f"accepted: folders written by mlfop-bench run")
    if Path(output).exists():
        raise BenchError(f"report folder {output} already exists; accepted: a new folder")


def write_report(directories: list[str], output: str) -> str:
    """Write ``report.md`` and ``curves.png`` into ``output`` (atomically); returns the markdown."""
    finals, targets = [], {}
    curves: dict[str, list[list[dict]]] = defaultdict(list)
    for folder in (RunFolder(Path(d)) for d in directories):
        config = folder.read_json("config.json")
        targets.update(config["targets"])
        evals = folder.records("eval")
        for final in folder.records("final"):
            finals.append({**final, "setting": setting(config, final["optimizer"])})
            curves[group_label(finals[-1])].append([r for r in evals if r["run"] == final["run"]])
    rows = aggregate(finals)
    table = markdown_table(rows, targets)
    markdown = "\n".join([
        "# mlfop-bench report",
        "",
        "Runs: " + ", ".join(f"`{d}`" for d in directories) + ". Cells: mean ± standard deviation over seeds; "
        "(k/n): only k of n seeds have a value.",
        "",
        table,
        "",
        "![held-out curves: mean over seeds, band from min to max](curves.png)",
        "",
    ])
    target = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.absolute().parent))
    (staging / "report.md").write_text(markdown)
    plot_aggregate(dict(curves), staging / "curves.png")
    os.replace(staging, target)
    return markdown
