"""The files of one benchmark invocation, written so that a kill at any point is resumable.

Layout (written under ``<output>.partial`` and renamed to ``<output>`` when everything is done)::

    .lock                 held (``flock``) by the process writing the folder; removed at the end
    tokenizer.npz         the tokenizer (km64: its fitted centroids)
    config.json           the full RunConfig, written last of the set-up: from then on resumable
    references.json       reference lines (independent sampler, priors, FD noise floor)
    metrics.jsonl         one JSON record per line: kind "train" | "eval" | "probe" | "final", per run
    tensorboard/<run>/    TensorBoard event files
    samples/<run>.npy     the final class-conditional samples (pixels)
    checkpoints/<run>.pt  the last checkpoint of each run (removed when the invocation ends)
    losses.png, samples_<run>.png, summary.md

Every file but the appended ``metrics.jsonl`` (whose torn last line a resume drops) and the
TensorBoard events is written to a temporary name and renamed, so a kill leaves either the old
file or the new one. A ``.partial`` folder without ``config.json`` was stopped before it
started: a fresh run with the same ``--output`` reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.tensorboard import SummaryWriter

from mlfop.bench.config import BenchError

__all__ = ["RunFolder", "partial_path", "folder_state", "check_output", "kill_point", "KILL_AT", "KILL_SIGNAL"]

KILL_AT = "MLFOP_BENCH_KILL_AT"
KILL_SIGNAL = "MLFOP_BENCH_KILL_SIGNAL"
_reached: Counter[str] = Counter()


def kill_point(phase: str) -> None:
    """Test hook: when ``$MLFOP_BENCH_KILL_AT`` is ``phase`` or ``phase@n``, send this process
    ``$MLFOP_BENCH_KILL_SIGNAL`` (default ``SIGKILL``) the n-th time (default first) it gets here."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    name, _, count = wanted.partition("@")
    if name == phase:
        _reached[phase] += 1
        if _reached[phase] == int(count or 1):
            os.kill(os.getpid(), signal.Signals[os.environ.get(KILL_SIGNAL, "SIGKILL")])


def partial_path(path: Path) -> Path:
    """Where a run writes until it finishes (renamed to ``path`` at the end)."""
    return path.with_name(path.name + ".partial")


def folder_state(path: Path) -> str:
    """``"finished"``, ``"running"`` (another process holds the lock), ``"interrupted"``
    (resumable), ``"unstarted"`` (stopped before its config was written), ``"taken"`` (``path``
    exists but is no run folder) or ``"new"``."""
    partial = partial_path(path)
    if path.exists():
        return "finished" if (path / "config.json").is_file() and (path / "metrics.jsonl").is_file() else "taken"
    if not partial.exists():
        return "new"
    if _lock_holder(partial) is not None:
        return "running"
    return "interrupted" if (partial / "config.json").is_file() else "unstarted"


def _lock_holder(root: Path) -> str | None:
    """The pid written in ``root/.lock`` when a live process holds it, else None."""
    lock = root / ".lock"
    if not lock.is_file():
        return None
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip() or "?"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def check_output(path: Path, resume: bool) -> None:
    """Refuse, with what to do instead, an ``--output`` this run cannot write (or resume)."""
    state, partial = folder_state(path), partial_path(path)
    resume_command = f"mlfop-bench run --resume --output {_quoted(path)}"
    if state == "running":
        raise BenchError(f"{partial} is in use by a running mlfop-bench (pid {_lock_holder(partial)}); wait for it "
                         f"to end (or stop it), then retry")
    if resume:
        if state == "interrupted":
            return
        raise BenchError({
            "new": f"--resume: no interrupted run at {partial}; start one without --resume",
            "finished": f"--resume: {path} is finished, nothing to resume (mlfop-bench report {_quoted(path)} "
                        f"reads it)",
            "taken": f"--resume: {path} is not a run folder; accepted: the --output of an interrupted run",
            "unstarted": f"--resume: {partial} was stopped before its config was written, so there is nothing to "
                         f"resume; run the original command again without --resume (it reuses the folder)",
        }[state])
    if state == "interrupted":
        raise BenchError(f"{partial} holds an interrupted run; continue it with: {resume_command} "
                         f"(or delete {partial} to start over)")
    if state in ("finished", "taken"):
        what = "holds a finished run" if state == "finished" else "already exists"
        raise BenchError(f"output folder {path} {what}; accepted: a new folder")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise OSError(f"{parent} is not a directory")
        with tempfile.TemporaryFile(dir=parent):  # a real write probe, removed at once
            pass
    except OSError as error:
        raise BenchError(f"output folder {path} is not writable ({error.strerror or error}); accepted: a "
                         f"folder under a writable directory") from None


def _quoted(path: Path) -> str:
    return shlex.quote(str(path))


class RunFolder:
    """Reads and writes the files listed in the module docstring under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.metrics = root / "metrics.jsonl"

    # ------------------------------------------------------------------ life cycle
    @contextlib.contextmanager
    def writing(self, fresh: bool) -> Iterator[None]:
        """Hold the folder's lock while the body writes it. ``fresh``: create the folder (or
        empty an unstarted one, keeping nothing: it holds no result); else the folder must be an
        interrupted run's, and its torn last record line, if any, is dropped."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BenchError(f"{self.root} is in use by another mlfop-bench; wait for it to end, then retry"
                                 ) from None
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            if fresh:
                for entry in self.root.iterdir():
                    if entry.name != ".lock":
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            elif self.metrics.exists():
                self._rewrite(self.records())
            kill_point("created")
            yield

    def finish(self, output: Path) -> None:
        """Drop the checkpoints and the lock file, then rename the folder to ``output``."""
        shutil.rmtree(self.root / "checkpoints", ignore_errors=True)
        kill_point("finish")
        (self.root / ".lock").unlink()
        os.replace(self.root, output)
        self.root, self.metrics = output, output / "metrics.jsonl"

    # ---------------------------------------------------------------------- files
    @contextlib.contextmanager
    def atomic(self, name: str) -> Iterator[IO[bytes]]:
        """A binary handle whose content replaces ``root/name`` only once the body completed."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as handle:
                yield handle
            kill_point(f"write:{name}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, name: str, save: Callable[[IO[bytes]], Any]) -> None:
        """Atomically write ``root/name`` with ``save(handle)`` (e.g. ``np.save``, ``torch.save``)."""
        with self.atomic(name) as handle:
            save(handle)

    def write_json(self, name: str, value: Any) -> None:
        self.write(name, lambda handle: handle.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode()))

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
        self._rewrite([r for r in self.records() if r["run"] != run or (r["kind"] != "final" and r["step"] <= step)])

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        self.write(self.metrics.name, lambda handle: handle.write(text.encode()))

    # ------------------------------------------------------------------- TensorBoard
    def writer(self, run: str, purge_step: int | None) -> SummaryWriter:
        """Event writer of ``run``; ``purge_step`` hides events a resumed run writes again."""
        return SummaryWriter(str(self.root / "tensorboard" / run), purge_step=purge_step)

    # ------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, run: str, state: dict[str, Any]) -> None:
        self.write(f"checkpoints/{run}.pt", lambda handle: torch.save(state, handle))

    def load_checkpoint(self, run: str) -> dict[str, Any] | None:
        path = self.root / "checkpoints" / f"{run}.pt"
        return torch.load(path, weights_only=False) if path.exists() else None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
