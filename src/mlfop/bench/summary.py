"""Tables of final metrics: runs grouped over seeds (mean and spread), with ratios to AdamW.

Used by ``mlfop-bench run`` (its stdout table and ``summary.md``) and ``mlfop-bench report``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

from mlfop.bench.config import METRICS, RunConfig

__all__ = ["setting", "group_label", "aggregate", "most_seeded", "markdown_table", "COLUMNS"]

# (record key, column title, digits)
COLUMNS = (("gen_nll", "gen NLL", 3), ("und_acc", "und acc", 3), ("und_nll", "und NLL", 3), ("fd", "FD", 0),
           ("text_nll", "text NLL", 3), ("loss_gen", "train gen", 3), ("loss_und", "train und", 3))
# Config keys that do not change what a run trains (or that the table shows in their own columns).
_NOT_SETTING = ("seeds", "output", "optimizers", "lrs", "threads", "targets", "eval_every", "samples")
DEFAULT_LEVELS = RunConfig().levels
# Config keys that only ML-FOP-SOAP reads.
_FOP_ONLY = ("levels", "stream_weights", "fold_tokens")


def setting(config: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """The part of a run folder's config that decides how ``optimizer`` trains, seed aside
    (without the ML-FOP-SOAP options for the other optimizers, so that their runs from folders
    that differ only there group together)."""
    dropped = _NOT_SETTING if optimizer == "mlfop" else _NOT_SETTING + _FOP_ONLY
    return {k: v for k, v in config.items() if k not in dropped}


def _key(record: dict[str, Any]) -> tuple:
    return json.dumps(record["setting"], sort_keys=True), record["optimizer"], record["lr"]


def group_label(record: dict[str, Any]) -> str:
    """A short name of the record's group (for plot legends), with ML-FOP-SOAP's levels when
    they are not the default."""
    config = record["setting"]
    levels = config.get("levels", DEFAULT_LEVELS)
    optimizer = record["optimizer"] + ("" if tuple(levels) == DEFAULT_LEVELS else f"[{_plain(levels)}]")
    return f"{config['model']} {config['tokenizer']} b{config['batch']} {optimizer} lr{record['lr']:g}"


def aggregate(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, optimizer, lr): the final records of its seeds (a seed that appears
    twice, from two folders, counts once). Each record needs a ``"setting"`` (see
    :func:`setting`), which the caller adds from its run folder's config."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in finals:
        runs = groups[_key(record)]
        if all(run["seed"] != record["seed"] for run in runs):
            runs.append(record)
    return [{"setting": runs[0]["setting"], "optimizer": optimizer, "lr": lr, "runs": runs}
            for (_, optimizer, lr), runs in groups.items()]


def most_seeded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of each optimizer in each setting, the rows (learning rates) with the most seeds: after a
    one-seed sweep and more seeds at the chosen rate, the chosen rate; after a sweep alone, all."""
    def kind(row: dict[str, Any]) -> str:
        return json.dumps([row["setting"], row["optimizer"]], sort_keys=True)

    most: dict[str, int] = {}
    for row in rows:
        most[kind(row)] = max(most.get(kind(row), 0), len(row["runs"]))
    return [row for row in rows if len(row["runs"]) == most[kind(row)]]


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
    """Rows with the same setting up to the ML-FOP-SOAP options compare to the same AdamW row."""
    return json.dumps({k: v for k, v in row["setting"].items() if k not in _FOP_ONLY}, sort_keys=True)


def _baselines(rows: list[dict]) -> dict[str, dict]:
    """Per comparable setting, AdamW's row with the fewest mean steps to all targets."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["optimizer"] != "adamw":
            continue
        key = _comparable(row)
        if key not in best or _mean_to_all(row, "steps") < _mean_to_all(best[key], "steps"):
            best[key] = row
    return best


def _mean_to_all(row: dict, what: str) -> float:
    """Mean over seeds of steps (or seconds) to all targets; infinite unless every seed got there."""
    values = [r.get(f"{what}_to_all") for r in row["runs"]]
    return float("inf") if any(v is None for v in values) else statistics.fmean(values)


def markdown_table(rows: list[dict[str, Any]], targets: dict[str, float]) -> str:
    """The rows as a markdown table; ratios are to the best AdamW row of the same setting (below 1:
    the optimizer needed fewer steps or seconds than AdamW). Settings that differ between rows
    beyond model, tokenizer and batch are spelled out in a "setting" column."""
    present = [c for c in COLUMNS if any(r.get(c[0]) is not None for row in rows for r in row["runs"])]
    shown = ("model", "tokenizer", "batch")
    varying = sorted({k for row in rows for k, v in row["setting"].items()
                      if k not in shown and any(other["setting"].get(k, v) != v for other in rows)})
    head = ["model", "tokenizer", "batch", *(["setting"] if varying else []), "optimizer", "lr", "seeds",
            *(title for _, title, _ in present),
            "steps→target", "s→target", "steps ×AdamW", "s ×AdamW", "s/step", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baselines = _baselines(rows)
    for row in rows:
        runs = row["runs"]
        base = baselines.get(_comparable(row))
        ratios = []
        for what in ("steps", "seconds"):
            mine, theirs = _mean_to_all(row, what), _mean_to_all(base, what) if base else float("inf")
            ratios.append(f"{mine / theirs:.2f}" if mine < float("inf") and 0 < theirs < float("inf") else "—")
        flags = sorted({name for r in runs for name in ("diverged", "stalled_gen", "stalled_und") if r.get(name)})
        config = row["setting"]
        described = ", ".join(f"{k}={_plain(config[k])}" for k in varying if k in config) or "—"
        cells = [config["model"], config["tokenizer"], str(config["batch"]), *([described] if varying else []),
                 row["optimizer"], f"{row['lr']:g}",
                 str(len(runs)), *(_cell([r.get(key) for r in runs], digits) for key, _, digits in present),
                 _cell([r.get("steps_to_all") for r in runs], 0), _cell([r.get("seconds_to_all") for r in runs], 1),
                 *ratios, _cell([r.get("seconds_per_step") for r in runs], 2), ", ".join(flags) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    wanted = ", ".join(f"{k} {'≥' if METRICS[k] else '≤'} {v:g}" for k, v in targets.items())
    lines.append("")
    lines.append(f"Target: {wanted or 'none'} (held-out, checked at every evaluation). s→target and s/step "
                 "count training time only (evaluations excluded). Ratios: steps (seconds) to the target over "
                 "those of the best AdamW row; below 1 is faster.")
    return "\n".join(lines)
