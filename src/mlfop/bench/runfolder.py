"""The files of one benchmark invocation.

Layout (written under ``<output>.partial`` and renamed to ``<output>`` when everything is done)::

    config.json           the full RunConfig
    tokenizer.npz         the tokenizer (km64: its fitted centroids)
    references.json       reference lines (independent sampler, priors, FD noise floor)
    metrics.jsonl         one JSON record per line: kind "train" | "eval" | "final", per run
    tensorboard/<run>/    TensorBoard event files
    samples/<run>.npy     the final class-conditional samples (pixels)
    checkpoints/<run>.pt  the last checkpoint of each run (removed when the invocation ends)
    losses.png, samples_<run>.png, summary.md
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

__all__ = ["RunFolder"]


class RunFolder:
    """Reads and writes the files listed in the module docstring under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.metrics = root / "metrics.jsonl"

    def write_json(self, name: str, value: Any) -> None:
        (self.root / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    # ----------------------------------------------------------------------- records
    def append(self, record: dict[str, Any]) -> None:
        """Add one record (non-finite floats are written as ``null``)."""
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(_finite(record), sort_keys=True) + "\n")

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The records (of ``kind``), in order; a last line cut short by a kill is ignored."""
        if not self.metrics.exists():
            return []
        text = self.metrics.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        rows = [json.loads(line) for line in lines if line]
        return [r for r in rows if kind is None or r["kind"] == kind]

    def discard_after(self, run: str, step: int) -> None:
        """Drop the records ``run`` wrote after its checkpoint at ``step`` (it will redo them; a step
        of -1 drops them all)."""
        kept = [r for r in self.records() if r["run"] != run or (r["kind"] != "final" and r["step"] <= step)]
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, self.metrics)

    # ------------------------------------------------------------------- TensorBoard
    def writer(self, run: str, purge_step: int | None) -> SummaryWriter:
        """Event writer of ``run``; ``purge_step`` hides events a resumed run writes again."""
        return SummaryWriter(str(self.root / "tensorboard" / run), purge_step=purge_step)

    # ------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, run: str, state: dict[str, Any]) -> None:
        """Write atomically: a kill during the save leaves the previous checkpoint intact."""
        path = self.root / "checkpoints" / f"{run}.pt"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, run: str) -> dict[str, Any] | None:
        path = self.root / "checkpoints" / f"{run}.pt"
        return torch.load(path, weights_only=False) if path.exists() else None

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.root / "checkpoints", ignore_errors=True)

    # ----------------------------------------------------------------------- samples
    def sample_path(self, run: str) -> Path:
        path = self.root / "samples" / f"{run}.npy"
        path.parent.mkdir(exist_ok=True)
        return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
