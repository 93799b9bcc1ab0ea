"""Tables of final metrics: runs grouped over seeds (mean and spread), with ratios to AdamW; the
best rate of each sweep; the stability of each optimizer over its rates.

Used by ``mlfop-bench run`` (its stdout table and ``summary.md``), ``mlfop-bench report`` and the
study driver (``benchmarks/study.py``, which picks the rates it gives more seeds with
:func:`best_rates`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from typing import Any

from mlfop.bench.config import METRICS, OPTIMIZER_OPTIONS, SAVED_DEFAULTS

__all__ = ["setting", "group_label", "aggregate", "most_seeded", "markdown_table", "best_rates", "best_rate_table",
           "stability_table", "claims_table", "COLUMNS", "REFERENCES"]

# (record key, column title, digits)
COLUMNS = (("gen_nll", "gen NLL", 3), ("best_gen_nll", "best gen NLL", 3), ("und_acc", "und acc", 3),
           ("und_nll", "und NLL", 3), ("fd", "FD", 0), ("text_nll", "text NLL", 3), ("loss_gen", "train gen", 3),
           ("loss_und", "train und", 3))
# Config keys that do not change what a run trains (or that the table shows in their own columns).
_NOT_SETTING = ("seeds", "output", "optimizers", "lrs", "muon_adamw_lrs", "threads", "targets", "eval_every",
                "samples", "train_samples", "probe_every", "diverge_factor", "diverge_patience")
_FAILURES = ("diverged", "stalled_gen", "stalled_und")
_FLAGS = (*_FAILURES, "overfit_gen", "overfit_und")  # overfitting: learned, then lost held out


def setting(config: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """The part of a run folder's config that decides how ``optimizer`` trains, seed and rate
    aside: without the options only other optimizers read (so that runs from folders that differ
    only there group together), with today's defaults for keys older folders lack."""
    full = {**SAVED_DEFAULTS, **config}
    return {k: v for k, v in full.items()
            if k not in _NOT_SETTING and optimizer in OPTIMIZER_OPTIONS.get(k, (optimizer,))}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _key(record: dict[str, Any]) -> tuple:
    return _json(record["setting"]), record["optimizer"], record["lr"], record.get("adamw_lr")


def _rate(row: dict[str, Any]) -> str:
    return f"{row['lr']:g}" + (f" (AdamW {row['adamw_lr']:g})" if row.get("adamw_lr") is not None else "")


def group_label(record: dict[str, Any]) -> str:
    """A short name of the record's group (for plot legends), with the optimizer's options that
    differ from the defaults in brackets."""
    config = record["setting"]
    changed = [f"{k}={_plain(v)}" for k, v in config.items() if k in OPTIMIZER_OPTIONS and _plain(v) != _plain(
        SAVED_DEFAULTS[k])]
    optimizer = record["optimizer"] + (f"[{','.join(changed)}]" if changed else "")
    return f"{config['model']} {config['tokenizer']} b{config['batch']} {optimizer} lr{_rate(record)}"


def aggregate(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, optimizer, rate): the final records of its seeds (a seed that appears
    twice, from two folders, counts once). Each record needs a ``"setting"`` (see
    :func:`setting`), which the caller adds from its run folder's config."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in finals:
        runs = groups[_key(record)]
        if all(run["seed"] != record["seed"] for run in runs):
            runs.append(record)
    return [{"setting": runs[0]["setting"], "optimizer": optimizer, "lr": lr, "adamw_lr": adamw_lr, "runs": runs}
            for (_, optimizer, lr, adamw_lr), runs in groups.items()]


def _kind(row: dict[str, Any]) -> str:
    """The sweep a row belongs to: its setting and optimizer."""
    return _json([row["setting"], row["optimizer"]])


def most_seeded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of each optimizer in each setting, the rows (learning rates) with the most seeds: after a
    one-seed sweep and more seeds at the chosen rate, the chosen rate; after a sweep alone, all."""
    most: dict[str, int] = {}
    for row in rows:
        most[_kind(row)] = max(most.get(_kind(row), 0), len(row["runs"]))
    return [row for row in rows if len(row["runs"]) == most[_kind(row)]]


def _plain(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _stats(values: list[float | None]) -> tuple[float, float, int] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return statistics.fmean(present), spread, len(present)


def _cell(values: list[float | None], digits: int) -> str:
    stats = _stats(values)
    if stats is None:
        return "—"
    mean, spread, n = stats
    text = f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if len(values) > 1 else "")
    return text if n == len(values) else f"{text} ({n}/{len(values)})"


def _comparable(row: dict) -> str:
    """Rows whose settings differ only in optimizer options compare to the same AdamW rows."""
    return _json({k: v for k, v in row["setting"].items() if k not in OPTIMIZER_OPTIONS})


def _mean_to_all(row: dict, what: str) -> float:
    """Mean over seeds of ``what`` (steps, samples, seconds, cpu_seconds) to all targets;
    infinite unless every seed got there."""
    values = [r.get(f"{what}_to_all") for r in row["runs"]]
    return math.inf if any(v is None for v in values) else statistics.fmean(values)


def _baselines(rows: list[dict], optimizer: str = "adamw") -> dict[str, dict]:
    """Per comparable setting, ``optimizer``'s row (any of its options and rates) with the fewest
    mean samples to all targets, then the lowest mean final gen NLL + answer NLL."""
    def order(row: dict) -> tuple[float, float]:
        losses = [_mean(row, key) for key in ("gen_nll", "und_nll")]
        return _mean_to_all(row, "samples"), math.inf if None in losses else sum(losses)

    best: dict[str, dict] = {}
    for row in rows:
        key = _comparable(row)
        if row["optimizer"] == optimizer and (key not in best or order(row) < order(best[key])):
            best[key] = row
    return best


def _ratio(row: dict, base: dict | None, what: str) -> str:
    """``row``'s mean samples (or CPU seconds, ``what``) to all targets over ``base``'s, or "—"."""
    mine, theirs = _mean_to_all(row, what), _mean_to_all(base, what) if base else math.inf
    return f"{mine / theirs:.2f}" if mine < math.inf and 0 < theirs < math.inf else "—"


def _mean(row: dict, key: str) -> float | None:
    """The mean over seeds of a final metric; None unless every seed has it."""
    values = [r.get(key) for r in row["runs"]]
    return None if any(v is None for v in values) else statistics.fmean(values)


def _varying(rows: list[dict]) -> list[str]:
    """Setting keys (beyond model, tokenizer and batch) whose values differ between rows."""
    shown = ("model", "tokenizer", "batch")
    return sorted({k for row in rows for k, v in row["setting"].items()
                   if k not in shown and any(other["setting"].get(k, v) != v for other in rows)})


def _lead(row: dict, varying: list[str]) -> list[str]:
    """The cells naming a row's setting: model, tokenizer, batch (and the varying keys), optimizer."""
    config = row["setting"]
    described = ", ".join(f"{k}={_plain(config[k])}" for k in varying if k in config) or "—"
    return [config["model"], config["tokenizer"], str(config["batch"]), *([described] if varying else []),
            row["optimizer"]]


def _head(varying: list[str], *titles: str) -> list[str]:
    columns = ["model", "tokenizer", "batch", *(["setting"] if varying else []), "optimizer", *titles]
    return [_row(columns), "|" + "---|" * len(columns)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(lines: list[str], note: str) -> str:
    """The table's lines, then its note after an empty line."""
    return "\n".join([*lines, "", note])


def _flags(runs: list[dict]) -> str:
    names = Counter()
    for run in runs:
        for name in _FLAGS:
            if run.get(name):
                names[f"{name} ({run['divergence']})" if name == "diverged" and run.get("divergence") else name] += 1
    return ", ".join(k + (f" {n}/{len(runs)}" if len(runs) > 1 else "") for k, n in sorted(names.items())) or "—"


def markdown_table(rows: list[dict[str, Any]], targets: dict[str, float]) -> str:
    """The rows as a markdown table; ratios are to the best AdamW row of the same setting up to
    optimizer options (below 1: fewer samples or CPU seconds than AdamW). Settings that differ
    between rows beyond model, tokenizer and batch are spelled out in a "setting" column."""
    present = [c for c in COLUMNS if any(r.get(c[0]) is not None for row in rows for r in row["runs"])]
    varying = _varying(rows)
    lines = _head(varying, "lr", "seeds", *(title for _, title, _ in present), "steps→target", "samples→target",
                  "CPU s→target", "samples ×AdamW", "CPU s ×AdamW", "CPU s/step", "flags")
    baselines = _baselines(rows)
    for row in rows:
        runs = row["runs"]
        base = baselines.get(_comparable(row))
        ratios = [_ratio(row, base, what) for what in ("samples", "cpu_seconds")]
        cells = [*_lead(row, varying), _rate(row), str(len(runs)),
                 *(_cell([r.get(key) for r in runs], digits) for key, _, digits in present),
                 _cell([r.get("steps_to_all") for r in runs], 0), _cell([r.get("samples_to_all") for r in runs], 0),
                 _cell([r.get("cpu_seconds_to_all") for r in runs], 1), *ratios,
                 _cell([r["train_cpu_seconds"] / max(r["step"], 1) for r in runs], 2), _flags(runs)]
        lines.append(_row(cells))
    wanted = ", ".join(f"{k} {'≥' if METRICS[k] else '≤'} {v:g}" for k, v in targets.items())
    return _table(lines, f"Target: {wanted or 'none'} (held-out, checked at every evaluation); samples: training "
                  "sequences (steps × batch). CPU s: the process's CPU time in training (evaluations excluded) on a "
                  "CPU machine, not GPU speed; compare rows run under the same load. Ratios: samples (CPU seconds) "
                  "to the target over those of the best AdamW row of the same setting; below 1 is faster.")


# (title, record key, how a row's value compares with the reference's: "ratio" or "difference")
_AGAINST = (("samples", "samples_to_all", "ratio"), ("CPU s", "cpu_seconds_to_all", "ratio"), ("FD", "fd", "ratio"),
            ("und acc", "und_acc", "difference"), ("gen NLL", "gen_nll", "difference"))
REFERENCES = ("adamw", "muon")


def claims_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each row against the best AdamW and the best Muon row of its setting (up to
    optimizer options; best: fewest mean samples to the targets, then the lowest losses), in the
    terms of the paper's claims: samples and CPU seconds to the targets and the Fréchet distance as ratios (0.80: 20%
    fewer), understanding accuracy and gen NLL as differences of the means over seeds."""
    varying = _varying(rows)
    names = {"adamw": "AdamW", "muon": "Muon"}
    lines = _head(varying, "lr", "seeds", *(f"{title} {'×' if how == 'ratio' else '−'}{names[ref]}"
                                             for ref in REFERENCES for title, _, how in _AGAINST))
    references = {ref: _baselines(rows, ref) for ref in REFERENCES}
    for row in rows:
        cells = [*_lead(row, varying), _rate(row), str(len(row["runs"]))]
        for ref in REFERENCES:
            base = references[ref].get(_comparable(row))
            for title, key, how in _AGAINST:
                if key.endswith("_to_all"):
                    cells.append(_ratio(row, base, key.removesuffix("_to_all")))
                    continue
                mine, theirs = _mean(row, key), None if base is None else _mean(base, key)
                if mine is None or theirs is None or (how == "ratio" and theirs <= 0):
                    cells.append("—")
                else:
                    cells.append(f"{mine / theirs:.2f}" if how == "ratio" else f"{mine - theirs:+.3f}")
        lines.append(_row(cells))
    return _table(lines, "References: of each setting (up to optimizer options), the AdamW row (any betas) and the "
                  "Muon row (any rates and options) with the fewest mean samples to the targets, then the lowest "
                  "final gen NLL + answer NLL; — where there is none or a value is missing (a seed short of the "
                  "target, no samples drawn). Ratios below 1 and accuracy above 0 favour the row; the paper claims, "
                  "against AdamW, 1.4x samples (0.71), 1.5x wall-clock (0.67; CPU seconds here), FID -20% (FD "
                  "0.80), text accuracy +4.3% (und acc +0.043).")


# ----------------------------------------------------------------------------- sweeps
def _score(row: dict, seed: int) -> tuple[float, float] | None:
    """Sweep order of a row from its run with ``seed``: fewest samples to all targets, then the
    lowest final gen NLL + answer NLL (None: no run with that seed)."""
    run = next((r for r in row["runs"] if r["seed"] == seed), None)
    if run is None:
        return None
    value = lambda key: math.inf if run.get(key) is None else run[key]  # noqa: E731
    return value("samples_to_all"), value("gen_nll") + value("und_nll")


def best_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sweep (setting and optimizer): ``best`` (its best row, by :func:`_score` on the
    sweep's seed, the smallest seed present), ``rows`` (every rate tried) and ``edges`` (the
    axes, ``"lr"`` or ``"adamw_lr"``, whose best value is the lowest or highest tried:
    ``{"lr": "highest"}``; empty when the best is interior, or an axis has one value)."""
    sweeps: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        sweeps[_kind(row)].append(row)
    chosen = []
    for group in sweeps.values():
        seed = min(r["seed"] for row in group for r in row["runs"])
        scored = [(score, row) for row in group if (score := _score(row, seed)) is not None]
        best = min(scored, key=lambda pair: pair[0])[1]
        edges = {}
        for axis in ("lr", "adamw_lr"):
            values = sorted({row[axis] for row in group if row.get(axis) is not None})
            if len(values) > 1 and best[axis] in (values[0], values[-1]):
                edges[axis] = "lowest" if best[axis] == values[0] else "highest"
        chosen.append({"best": best, "rows": group, "edges": edges})
    return chosen


def best_rate_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each sweep's rates, its best one and whether that is at an edge of the sweep."""
    varying = _varying(rows)
    lines = _head(varying, "rates", "best", "at an edge", "samples→target", "gen NLL", "und NLL")
    for sweep in best_rates(rows):
        best, group = sweep["best"], sweep["rows"]
        rates = ", ".join(_rate(row) for row in sorted(group, key=lambda r: (r["lr"], r.get("adamw_lr") or 0)))
        edge = ", ".join(f"{axis} {where}: widen" for axis, where in sweep["edges"].items()) or "no"
        if len(group) < 4:
            edge += f" ({len(group)} rates)"
        seed = min(r["seed"] for r in best["runs"])
        run = next(r for r in best["runs"] if r["seed"] == seed)
        cells = [*_lead(best, varying), rates, _rate(best), edge, _cell([run.get("samples_to_all")], 0),
                 _cell([run.get("gen_nll")], 3), _cell([run.get("und_nll")], 3)]
        lines.append(_row(cells))
    return _table(lines, "Best: fewest samples to the target, then lowest final gen NLL + answer NLL, on the sweep's "
                  "seed (its smallest). At an edge: the best rate is the lowest or highest tried, so the sweep "
                  "should be widened on that side.")


# -------------------------------------------------------------------------- stability
def _failed(runs: list[dict]) -> bool:
    """Whether a seed diverged or stalled (overfitting is not a failure of the optimizer)."""
    return any(r.get(name) for r in runs for name in _FAILURES)


def _outcome(runs: list[dict]) -> str:
    """What happened and in how many seeds: ``ok`` when no seed diverged or stalled, with
    overfitting noted in brackets."""
    flags = _flags(runs)
    return flags if _failed(runs) else "ok" + ("" if flags == "—" else f" ({flags})")


def _peaks(runs: list[dict]) -> str:
    """The seeds' peak training loss over the first (:func:`mlfop.bench.metrics.peak_loss_ratio`),
    in seed order: how close each came to the divergence stop line; and, where a seed passed it,
    each seed's longest run of consecutive steps above it (what ``--diverge-patience`` counts)."""
    seeds = sorted(runs, key=lambda r: r["seed"])
    peaks, above = ([r.get(key) for r in seeds] for key in ("peak_loss_ratio", "run_above_line"))
    if all(p is None for p in peaks):
        return ""
    streaks = "" if not any(above) else "; steps in a row above the line: " + ", ".join(
        "—" if n is None else str(n) for n in above)
    return " (peak ×" + ", ".join("—" if p is None else f"{p:.2f}" for p in peaks) + streaks + ")"


def _stable_range(group: list[dict]) -> tuple[float | None, dict | None, list[float]]:
    """Of one series sorted by rate: the largest rate of the stable range (from the lowest rate
    that held up to the first failure above it; failures below that range, typically stalls of a
    rate too small for the budget, show in the outcome column only), that first failure (the
    lowest failing rate when none held), and the rates above it that hold again."""
    held = [not _failed(row["runs"]) for row in group]
    if not any(held):
        return None, group[0], []
    end = next((i for i in range(held.index(True), len(group)) if not held[i]), len(group))
    return group[end - 1]["lr"], group[end] if end < len(group) else None, [
        row["lr"] for row, ok in zip(group[end:], held[end:]) if ok]


def stability_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per optimizer and setting (Muon: and rate of its AdamW part), the outcome of
    every rate, the largest rate of the stable range (:func:`_stable_range`; rates that hold
    again past its first failure in brackets), and that first failure."""
    series: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        series[_kind(row), row.get("adamw_lr")].append(row)
    varying = _varying(rows)
    lines = _head(varying, "clip", "outcome per rate", "largest stable rate", "first failure above it")
    for (_, adamw_lr), group in series.items():
        group.sort(key=lambda row: row["lr"])
        largest, failure, again = _stable_range(group)
        part = "" if adamw_lr is None else f" (AdamW {adamw_lr:g})"
        cells = [*_lead(group[0], varying), f"{group[0]['setting']['clip']:g}",
                 "; ".join(f"{row['lr']:g}: {_outcome(row['runs'])}{_peaks(row['runs'])}" for row in group),
                 ("none" if largest is None else f"{largest:g}") + part
                 + ("" if not again else f" (holds again at {', '.join(f'{lr:g}' for lr in again)})"),
                 "—" if failure is None else f"{failure['lr']:g}: {_outcome(failure['runs'])}"]
        lines.append(_row(cells))
    return _table(lines, "Largest stable rate: the top of the range of rates that held, from the lowest that held "
                  "(failures below it, typically a rate too small for the budget, show in the outcomes only) "
                  "to the first failure above it (rates that hold again above that failure in brackets). "
                  "Stable: no seed diverged (a non-finite or exploding training loss, or a held-out loss that "
                  "ended above its start) or stalled (a task's final held-out NLL not clearly below its prior). "
                  "Overfit (noted, not a failure): the held-out NLL went clearly below its prior and then back, "
                  "while the final training loss lies below its best held-out value. "
                  "Peak ×: each seed's largest training loss of a stream over that stream's first, the "
                  "quantity the divergence stop line (`--diverge-factor`, by default 2) is drawn on; where a seed "
                  "passed the line, each seed's longest run of consecutive steps above it (a run stops once "
                  "that reaches `--diverge-patience`, by default 1, so a longest run of 1 is a one-step "
                  "spike). "
                  "Clip 0: no gradient clipping.")
