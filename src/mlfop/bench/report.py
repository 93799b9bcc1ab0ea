"""``mlfop-bench report DIR...``: aggregate finished run folders into tables and figures.

A ``DIR`` is a run folder or a folder holding run folders at any depth (a study's root, see
``benchmarks/study.py``); unfinished (``.partial``) folders are skipped and counted. The report
(``report.md``) holds the sweep table (every optimizer at every rate), the best rate of each
sweep, the seed table (the rates with the most seeds, when more than one), the claims table
(those rows against the best AdamW and Muon rows: ratios of samples, CPU seconds and Fréchet
distance, differences of accuracy and gen NLL), the stability table (with each seed's peak
training loss over its first), held-out curves per model and batch, and per-layer
heterogeneity figures for the runs with probe records (``--probe-every``). Times to target are
computed from each run's held-out curve, for the targets the runs were given or for
``--targets``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlfop.bench.config import METRICS, OPTIMIZERS, BenchError, RunConfig
from mlfop.bench.metrics import longest_run_above, lowest, peak_loss_ratio, run_flags, time_to_targets
from mlfop.bench.plots import plot_aggregate, plot_heterogeneity
from mlfop.bench.runfolder import RunFolder
from mlfop.bench.summary import (aggregate, best_rate_table, claims_table, group_label, markdown_table, most_seeded,
                                 setting, stability_table)

__all__ = ["parse_source", "run_folders", "check_report_input", "load_finals", "write_report"]


def parse_source(source: str) -> tuple[str, tuple[str, ...] | None]:
    """``DIR`` (every run) or ``DIR:OPT,OPT`` (the runs of those optimizers only)."""
    directory, _, chosen = source.rpartition(":")
    names = tuple(chosen.split(","))
    if directory and not Path(source).exists() and all(name in OPTIMIZERS for name in names):
        return directory, names
    return source, None


def _finished(path: Path) -> bool:
    return not path.name.endswith(".partial") and (path / "metrics.jsonl").is_file() and (
        path / "config.json").is_file()


def run_folders(directory: Path) -> tuple[list[Path], list[Path]]:
    """The finished run folders at or below ``directory``, and the unfinished ones (sorted)."""
    if _finished(directory):
        return [directory], []
    found = sorted(path.parent for path in directory.rglob("config.json") if _finished(path.parent))
    unfinished = sorted(path for path in directory.rglob("*.partial") if path.is_dir())
    return found, unfinished


def _targets(sources: list[str], targets: dict[str, float] | None) -> dict[str, float]:
    """``targets`` when given, else those of the run folders, which must agree."""
    if targets is not None:
        return targets
    seen: dict[str, dict[str, float]] = {}
    for directory, _ in map(parse_source, sources):
        for folder in run_folders(Path(directory))[0]:
            seen[str(folder)] = RunFolder(folder).read_json("config.json")["targets"]
    distinct = {tuple(sorted(t.items())) for t in seen.values()}
    if len(distinct) > 1:
        a, b = sorted(distinct)[:2]
        raise BenchError(f"the run folders were given different targets ({dict(a)} and {dict(b)}); choose the "
                         f"report's with --targets KEY=VALUE")
    return next(iter(seen.values()))


def check_report_input(sources: list[str], output: str, targets: dict[str, float] | None = None) -> None:
    """Each source must hold a finished run folder, the targets must be known metrics with finite
    values that all folders agree on (or given), and the output folder must be new."""
    for directory, _ in map(parse_source, sources):
        if not run_folders(Path(directory))[0]:
            raise BenchError(f"{directory} is not a finished mlfop-bench run folder and holds none (no metrics.jsonl"
                             f"/config.json); accepted: folders written by mlfop-bench run, or folders holding them")
    for name, value in (targets or {}).items():
        if name not in METRICS or not math.isfinite(value):
            raise BenchError(f"--targets {name}={value:g}: accepted: finite values of {', '.join(METRICS)}")
    _targets(sources, targets)
    if Path(output).exists():
        raise BenchError(f"report folder {output} already exists; accepted: a new folder")


def load_finals(sources: list[str], targets: dict[str, float] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, float], list[Path]]:
    """The final records of the sources' runs, each with its ``setting``, held-out ``curve`` and
    ``probes``, peak loss ratio and longest run of steps above the divergence line (its own, or
    the default's where it had none), times to target recomputed for the targets (returned too)
    and flags recomputed from the curve and the folder's references (runs of older versions gain
    the newer flags; a folder without references keeps its stored ones); and the unfinished
    folders found."""
    targets = _targets(sources, targets)
    finals, unfinished = [], []
    for directory, chosen in map(parse_source, sources):
        found, partial = run_folders(Path(directory))
        unfinished += partial
        for path in found:
            folder = RunFolder(path)
            config = folder.read_json("config.json")
            line = config.get("diverge_factor") or RunConfig.diverge_factor  # a run without one: the default's
            records = folder.records()
            refs = folder.read_json("references.json") if (path / "references.json").exists() else None
            for final in (r for r in records if r["kind"] == "final"):
                if chosen is not None and final["optimizer"] not in chosen:
                    continue
                mine = [r for r in records if r["run"] == final["run"]]
                curve, trains = ([r for r in mine if r["kind"] == kind] for kind in ("eval", "train"))
                stopped = final["divergence"] if final.get("diverged_step") is not None else None  # the loop's stop
                flags = {} if refs is None else run_flags(curve, refs, stopped, final)  # else the stored ones
                finals.append({**final, **time_to_targets(curve, targets, final["batch"]), **flags,
                               "best_gen_nll": lowest(curve, "gen_nll"),
                               "peak_loss_ratio": peak_loss_ratio(trains),
                               "run_above_line": longest_run_above(trains, line),
                               "setting": setting(config, final["optimizer"]), "curve": curve,
                               "probes": [r for r in mine if r["kind"] == "probe"]})
    return finals, targets, unfinished


def write_report(sources: list[str], output: str, targets: dict[str, float] | None = None) -> str:
    """Write ``report.md`` and its figures into ``output`` (atomically); returns the markdown.

    ``sources``: run folders or folders holding them, each ``DIR`` or ``DIR:OPT,OPT`` (see
    :func:`parse_source`); ``targets``: for the time-to-target columns (default: the runs')."""
    finals, targets, unfinished = load_finals(sources, targets)
    rows = aggregate(finals)
    chosen = most_seeded(rows)
    seeded = [row for row in chosen if len(row["runs"]) > 1]
    target = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.absolute().parent))
    try:
        curves = _curve_figures(chosen, staging)
        probes = _heterogeneity_figures(seeded or chosen, staging)
        markdown = "\n".join([
            "# mlfop-bench report",
            "",
            f"{sum(len(row['runs']) for row in rows)} runs from " + ", ".join(f"`{d}`" for d in sources)
            + (f"; {len(unfinished)} unfinished folders skipped (resume them first)" if unfinished else "")
            + ". Cells: mean ± standard deviation over seeds; (k/n): only k of n seeds have a value.",
            "",
            "## Sweep: every optimizer at every rate",
            "",
            markdown_table(rows, targets),
            "",
            "## Best rate of each sweep",
            "",
            best_rate_table(rows),
            "",
            *(["## Seeds at the chosen rates", "", markdown_table(seeded, targets), ""] if seeded else []),
            "## Against AdamW and Muon (the paper's claims)",
            "",
            claims_table(seeded or chosen),
            "",
            "## Stability",
            "",
            stability_table(rows),
            "",
            "## Held-out curves",
            "",
            "Each optimizer's rates with the most seeds: mean over seeds, band from min to max.",
            "",
            *curves,
            *(["## Gradient heterogeneity per layer", "", *probes] if probes else []),
        ])
        (staging / "report.md").write_text(markdown)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return markdown


def _curve_figures(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """One figure of held-out curves per model and batch; their markdown lines."""
    figures: dict[str, dict[str, list[list[dict]]]] = {}
    for row in rows:
        config = row["setting"]
        plotted = figures.setdefault(f"curves-{config['model']}-{config['batch']}.png", {})
        label = group_label(row["runs"][0])
        plotted[label if label not in plotted else f"{label} ({len(plotted) + 1})"] = [r["curve"] for r in row["runs"]]
    for name, plotted in figures.items():
        plot_aggregate(plotted, folder / name)
    return [f"![{name.removesuffix('.png')}]({name})\n" for name in sorted(figures)]


def _heterogeneity_figures(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """One figure per row whose runs recorded probes; their markdown lines."""
    lines = []
    for row in (row for row in rows if any(run["probes"] for run in row["runs"])):
        label = group_label(row["runs"][0])
        name = f"heterogeneity-{len(lines) + 1}.png"
        plot_heterogeneity([run["probes"] for run in row["runs"]], f"{label} ({len(row['runs'])} seeds)",
                           folder / name)
        lines.append(f"![{label}]({name})\n")
    return lines
