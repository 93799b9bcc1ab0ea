"""Tables of final metrics: runs grouped over seeds (mean and spread), with ratios to AdamW.

Used by ``mlfop-bench run`` (its stdout table and ``summary.md``) and ``mlfop-bench report``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from mlfop.bench.config import METRICS

__all__ = ["group_key", "aggregate", "markdown_table", "COLUMNS"]

# (record key, column title, digits)
COLUMNS = (("gen_nll", "gen NLL", 3), ("und_acc", "und acc", 3), ("und_nll", "und NLL", 3), ("fd", "FD", 0),
           ("text_nll", "text NLL", 3), ("loss_gen", "train gen", 3), ("loss_und", "train und", 3))
GROUP_FIELDS = ("model", "tokenizer", "batch", "optimizer", "lr")


def group_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(f) for f in GROUP_FIELDS)


def aggregate(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, tokenizer, batch, optimizer, lr): the final records of its seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in finals:
        groups[group_key(record)].append(record)
    return [{**dict(zip(GROUP_FIELDS, key)), "runs": runs} for key, runs in groups.items()]


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


def _baselines(rows: list[dict]) -> dict[tuple, dict]:
    """Per (model, tokenizer, batch), AdamW's row with the fewest mean steps to all targets."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["optimizer"] != "adamw":
            continue
        key = (row["model"], row["tokenizer"], row["batch"])
        if key not in best or _mean_steps(row, "steps") < _mean_steps(best[key], "steps"):
            best[key] = row
    return best


def _mean_steps(row: dict, what: str) -> float:
    """Mean over seeds of steps (or seconds) to all targets; infinite unless every seed got there."""
    values = [r.get(f"{what}_to_all") for r in row["runs"]]
    return float("inf") if any(v is None for v in values) else statistics.fmean(values)


def markdown_table(rows: list[dict[str, Any]], targets: dict[str, float]) -> str:
    """The rows as a markdown table; ratios are to the best AdamW row of the same model and batch
    (below 1: the optimizer needed fewer steps or seconds than AdamW)."""
    present = [c for c in COLUMNS if any(r.get(c[0]) is not None for row in rows for r in row["runs"])]
    head = ["model", "tokenizer", "batch", "optimizer", "lr", "seeds", *(title for _, title, _ in present),
            "steps→target", "s→target", "steps ×AdamW", "s ×AdamW", "s/step", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baselines = _baselines(rows)
    for row in rows:
        runs = row["runs"]
        base = baselines.get((row["model"], row["tokenizer"], row["batch"]))
        ratios = []
        for what in ("steps", "seconds"):
            mine, theirs = _mean_steps(row, what), _mean_steps(base, what) if base else float("inf")
            ratios.append(f"{mine / theirs:.2f}" if mine < float("inf") and 0 < theirs < float("inf") else "—")
        flags = sorted({name for r in runs for name in ("diverged", "stalled_gen", "stalled_und") if r.get(name)})
        cells = [row["model"], row["tokenizer"], str(row["batch"]), row["optimizer"], f"{row['lr']:g}",
                 str(len(runs)), *(_cell([r.get(key) for r in runs], digits) for key, _, digits in present),
                 _cell([r.get("steps_to_all") for r in runs], 0), _cell([r.get("seconds_to_all") for r in runs], 1),
                 *ratios, _cell([r.get("seconds_per_step") for r in runs], 2), ", ".join(flags) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    wanted = ", ".join(f"{k} {'≥' if METRICS[k] else '≤'} {v:g}" for k, v in targets.items())
    lines.append("")
    lines.append(f"Target: {wanted or 'none'} (held-out, checked at every evaluation). "
                 "Ratios: steps (seconds) to the target over those of the best AdamW row; below 1 is faster.")
    return "\n".join(lines)
