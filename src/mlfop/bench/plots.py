"""PNG figures (matplotlib, Agg backend): loss curves, digit grids, seed-aggregated curves and
per-layer gradient heterogeneity."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import IO, Any, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

__all__ = ["plot_losses", "plot_samples", "plot_aggregate", "plot_heterogeneity"]

Target = Union[str, os.PathLike, IO[bytes]]  # where a figure is saved (PNG)

_EVAL_PANELS = (("gen_nll", "held-out gen NLL / code", "independent_sampler_nll"),
                ("und_nll", "held-out answer NLL", "und_prior_nll"),
                ("und_acc", "held-out und accuracy", None),
                ("fd", "pixel FD of samples", "fd_noise_floor"))


def plot_losses(records: list[dict[str, Any]], refs: dict[str, float], path: Target) -> None:
    """Top row: train loss of every stream; bottom row: held-out metrics; one line per run."""
    streams = sorted({k[5:] for r in records if r["kind"] == "train" for k in r if k.startswith("loss_")})
    panels = [p for p in _EVAL_PANELS if any(p[0] in r for r in records if r["kind"] == "eval")]
    columns = max(len(streams), len(panels), 1)
    fig, axes = plt.subplots(2, columns, figsize=(4 * columns, 7), squeeze=False)
    runs = sorted({r["run"] for r in records})
    for run in runs:
        train = [r for r in records if r["run"] == run and r["kind"] == "train"]
        evals = [r for r in records if r["run"] == run and r["kind"] == "eval"]
        for ax, stream in zip(axes[0], streams):
            _line(ax, [(r["step"], r.get(f"loss_{stream}")) for r in train], run)
            ax.set_title(f"train loss: {stream}")
        for ax, (key, title, _) in zip(axes[1], panels):
            _line(ax, [(r["step"], r.get(key)) for r in evals], run, marker="o", markersize=3)
            ax.set_title(title)
    for ax, (_, _, ref) in zip(axes[1], panels):
        if ref and ref in refs:
            ax.axhline(refs[ref], color="grey", linestyle="--", linewidth=1, label=ref.replace("_", " "))
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _line(ax, points: list[tuple[int, float | None]], label: str, **style: Any) -> None:
    """Plot the points with a value (a diverged run's missing values are left out)."""
    kept = [(x, y) for x, y in points if y is not None]
    if kept:
        ax.plot(*zip(*kept), label=label, **style)


def plot_samples(images: np.ndarray, title: str, path: Target, per_class: int = 8) -> None:
    """Rows: digits 0-9; columns: the first ``per_class`` samples of each (samples are class-sorted),
    drawn as one mosaic with a one-pixel gap."""
    per_class = min(per_class, len(images) // 10)
    grid = images.reshape(10, len(images) // 10, 8, 8)[:, :per_class]
    mosaic = np.full((10 * 9 + 1, per_class * 9 + 1), np.nan)
    for digit in range(10):
        for column in range(per_class):
            mosaic[1 + 9 * digit : 9 + 9 * digit, 1 + 9 * column : 9 + 9 * column] = grid[digit, column]
    fig, ax = plt.subplots(figsize=(0.5 * per_class + 0.8, 5.6))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=16)
    ax.set_xticks([])
    ax.set_yticks(4.5 + 9 * np.arange(10), [str(d) for d in range(10)])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_aggregate(groups: dict[str, list[list[dict[str, Any]]]], path: Target) -> None:
    """Held-out curves per group: the mean over seeds with a band from the lowest to the highest
    (one colour per group, one legend below the panels)."""
    panels = [p for p in _EVAL_PANELS
              if any(p[0] in r for runs in groups.values() for run in runs for r in run)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for index, (label, runs) in enumerate(groups.items()):
        colour = colours(index % colours.N)
        for ax, (key, title, _) in zip(axes[0], panels):
            by_step = _by_step([[(r["step"], r.get(key)) for r in run] for run in runs])
            steps = sorted(by_step)
            if not steps:
                continue
            values = [by_step[s] for s in steps]
            ax.plot(steps, [np.mean(v) for v in values], label=label, color=colour)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=colour)
            ax.set_title(title)
            ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = max(1, -(-len(labels) // 4))
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, min(0.5, 0.06 * rows), 1, 1))
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


_PROBE_PANELS = (("cos", "cos(grad L_gen, grad L_und)", "linear"), ("norm_ratio", "|grad L_gen| / |grad L_und|", "log"),
                 ("conflict", "conflict fraction (tensors with cos < 0)", "linear"))


def plot_heterogeneity(probes: list[list[dict[str, Any]]], title: str, path: Target) -> None:
    """Per-layer gradient heterogeneity over training, from the probe records of each seed's run
    (mean over seeds): cosine, norm ratio and conflict fraction, one line per layer and a thick
    black line over all parameters."""
    layers = list(dict.fromkeys(name for run in probes for r in run for name, v in r["layers"].items()
                                if v["cos"] is not None))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), squeeze=False)
    colours = plt.get_cmap("viridis")
    for ax, (key, label, scale) in zip(axes[0], _PROBE_PANELS):
        for index, layer in enumerate(layers):
            _mean_line(ax, [[(r["step"], r["layers"].get(layer, {}).get(key)) for r in run] for run in probes],
                       label=layer, color=colours(index / max(1, len(layers) - 1)), linewidth=1)
        _mean_line(ax, [[(r["step"], r.get(key)) for r in run] for run in probes], label="all parameters",
                   color="black", linewidth=2.5)
        if key == "cos":
            ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale(scale)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _by_step(runs: list[list[tuple[int, float | None]]]) -> dict[int, list[float]]:
    """The values of the runs' points, gathered by step (points without a value left out)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for x, y in run:
            if y is not None:
                by_step[x].append(y)
    return by_step


def _mean_line(ax, runs: list[list[tuple[int, float | None]]], **style: Any) -> None:
    """The mean over runs of the points with a value, by step."""
    by_step = _by_step(runs)
    _line(ax, [(x, float(np.mean(by_step[x]))) for x in sorted(by_step)], style.pop("label"), **style)
