"""``mlfop-bench report DIR...``: aggregate finished run folders over seeds into markdown and plots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlfop.bench.config import OPTIMIZERS, BenchError
from mlfop.bench.plots import plot_aggregate
from mlfop.bench.runfolder import RunFolder
from mlfop.bench.summary import aggregate, group_label, markdown_table, most_seeded, setting

__all__ = ["parse_source", "check_report_input", "write_report"]


def parse_source(source: str) -> tuple[str, tuple[str, ...] | None]:
    """``DIR`` (every run) or ``DIR:OPT,OPT`` (the runs of those optimizers only)."""
    directory, _, chosen = source.rpartition(":")
    names = tuple(chosen.split(","))
    if directory and not Path(source).exists() and all(name in OPTIMIZERS for name in names):
        return directory, names
    return source, None


def check_report_input(sources: list[str], output: str) -> None:
    """Each source must be a finished run folder; the output folder must be new."""
    for directory, _ in map(parse_source, sources):
        if not (Path(directory) / "metrics.jsonl").is_file() or not (Path(directory) / "config.json").is_file():
            raise BenchError(f"{directory} is not a finished mlfop-bench run folder (no metrics.jsonl/config.json); "
                             f"accepted: folders written by mlfop-bench run")
    if Path(output).exists():
        raise BenchError(f"report folder {output} already exists; accepted: a new folder")


def write_report(sources: list[str], output: str) -> str:
    """Write ``report.md`` and ``curves.png`` into ``output`` (atomically); returns the markdown.

    ``sources``: run folders, each ``DIR`` or ``DIR:OPT,OPT`` (see :func:`parse_source`)."""
    finals, targets = [], {}
    for directory, chosen in map(parse_source, sources):
        folder = RunFolder(Path(directory))
        config = folder.read_json("config.json")
        targets.update(config["targets"])
        evals = folder.records("eval")
        for final in folder.records("final"):
            if chosen is not None and final["optimizer"] not in chosen:
                continue
            finals.append({**final, "setting": setting(config, final["optimizer"]),
                           "curve": [r for r in evals if r["run"] == final["run"]]})
    rows = aggregate(finals)
    table = markdown_table(rows, targets)
    plotted: dict[str, list[list[dict]]] = {}
    for row in most_seeded(rows):  # labels name model, batch, optimizer, rate and levels; number the rest
        label = group_label(row["runs"][0])
        plotted[label if label not in plotted else f"{label} ({len(plotted) + 1})"] = [run["curve"] for run in row["runs"]]
    markdown = "\n".join([
        "# mlfop-bench report",
        "",
        "Runs: " + ", ".join(f"`{d}`" for d in sources) + ". Cells: mean ± standard deviation over seeds; "
        "(k/n): only k of n seeds have a value.",
        "",
        table,
        "",
        "![held-out curves of each optimizer's rates with the most seeds: mean over seeds, band from min to "
        "max](curves.png)",
        "",
    ])
    target = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.absolute().parent))
    (staging / "report.md").write_text(markdown)
    plot_aggregate(plotted, staging / "curves.png")
    os.replace(staging, target)
    return markdown
