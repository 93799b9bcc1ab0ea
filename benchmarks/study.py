"""Run a study plan of ``mlfop-bench run`` jobs, a few at a time with one thread each, resumably.

``python benchmarks/study.py PLAN.toml`` (``benchmarks/study.toml`` is issue 14's study). A plan
(TOML or YAML) names run-folder ``root``, ``models``, ``batches`` (each a table of RunConfig keys,
e.g. ``micro_batch``), ``contenders`` (each an ``optimizer``, its ``lrs`` and any RunConfig keys),
``common`` RunConfig keys, ``targets``, the sweep's ``seeds``, the ``extra_seeds`` of the chosen
rate, ``widen``, ``evals`` and ``probes`` (evaluations and heterogeneity probes per run) and
``parallel`` (jobs at once). A job is one run (model, batch, contender, rate, seed), in its own
folder ``<root>/<model>-b<batch>/<contender>/lr<rate>[-adamw<rate>]-s<seed>``. For each model,
batch and contender (a contender's ``models`` and ``batches`` lists restrict where it runs, its
``extra_seeds`` and ``widen`` override the plan's) the driver runs

1. the sweep: every rate (Muon: times every rate of its AdamW part) with ``seeds``;
2. the widening: while the best rate (``mlfop.bench.summary.best_rates``: fewest samples to the
   targets, then the lowest final loss) is the lowest or highest tried, one more rate past it at
   the grid's ratio, at most ``widen`` per side;
3. the seeds: the best rate with ``extra_seeds``.

Every start reads the folders: finished jobs are skipped, interrupted ones resumed
(``--resume``), unstarted ones started over; a folder another process is writing is left alone.
Ctrl-C (or SIGTERM) interrupts the running jobs, each resumable, and the same command continues
the study. A job that fails is reported with its log (``<folder>.log``) and not retried until the
next start. ``--dry-run`` prints the commands of the jobs that could start now; ``--only GLOB``
keeps the jobs whose name (``emu3-b1024/adamw/lr0.003-s0``) matches; ``--set KEY=VALUE`` overrides a
plan key (a dotted path, a TOML value), so a targeted run needs no copy of the plan: ``--set parallel=1
--set widen=0 --set contenders.mlfop.lrs=[0.01]``. ``mlfop-bench report ROOT`` makes every table and
figure from the folders.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlfop.bench.config import (MUON_BASED, SAVED_DEFAULTS, BenchError, RunConfig, coerce_config, config_from,
                                read_table)
from mlfop.bench.report import load_finals
from mlfop.bench.runfolder import folder_state
from mlfop.bench.summary import aggregate, best_rates

PLAN_KEYS = ("root", "parallel", "models", "batches", "contenders", "common", "targets", "seeds", "extra_seeds",
             "widen", "evals", "probes")
STAGE_KEYS = ("extra_seeds", "widen")  # a contender may override these plan keys
SCOPE_KEYS = ("models", "batches")  # a contender may run on some models or batches only
POLL_SECONDS = 0.5
PROGRESS_SECONDS = 60  # a job's progress bar writes to its log at most this often
STOP_SECONDS = 120  # how long an interrupted job may take to save before it is killed


@dataclass(frozen=True)
class Job:
    """One run of the study."""

    model: str
    batch: int
    contender: str
    lr: float
    adamw_lr: float | None
    seed: int

    @property
    def name(self) -> str:
        rate = f"lr{self.lr:g}" + ("" if self.adamw_lr is None else f"-adamw{self.adamw_lr:g}")
        return f"{self.model}-b{self.batch}/{self.contender}/{rate}-s{self.seed}"


class Plan:
    """A study plan, checked: every job's configuration is validated before anything runs."""

    def __init__(self, path: str, overrides: Sequence[str] = ()) -> None:
        plan = read_table(path, "plan")
        for override in overrides:
            _override(plan, override, path)
        unknown = sorted(set(plan) - set(PLAN_KEYS))
        if unknown or not all(plan.get(key) for key in ("models", "batches", "contenders")):
            raise BenchError(f"plan {path}: keys {', '.join(PLAN_KEYS)} (models, batches and contenders required)"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        _check_shapes(plan, path)
        self.path, self.root = path, Path(plan.get("root", "study"))
        self.parallel, self.models = int(plan.get("parallel", 2)), list(plan["models"])
        self.batches = {int(batch): dict(keys) for batch, keys in plan["batches"].items()}
        self.common, self.targets = dict(plan.get("common", {})), dict(plan.get("targets", RunConfig().targets))
        self.seeds = [int(s) for s in plan.get("seeds", [0])]
        self.defaults = {"extra_seeds": plan.get("extra_seeds", []), "widen": plan.get("widen", 0)}
        self.evals, self.probes = int(plan.get("evals", 20)), int(plan.get("probes", 0))
        self.contenders = {name: dict(keys) for name, keys in plan["contenders"].items()}
        for name, keys in self.contenders.items():
            if "optimizer" not in keys or not keys.get("lrs"):
                raise BenchError(f"plan {path}: contender {name!r} needs an optimizer and its lrs")
            outside = set(map(int, keys.get("batches", []))) - set(self.batches)
            if outside:
                raise BenchError(f"plan {path}: contender {name!r} names batches {sorted(outside)} that the plan's "
                                 f"batches table lacks; accepted: {', '.join(map(str, self.batches))}")
        for job in self.sweep():
            self.config(job).validate()

    def stage(self, contender: str, key: str) -> Any:
        return self.contenders[contender].get(key, self.defaults[key])

    def groups(self) -> list[tuple[str, int, str]]:
        """(model, batch, contender) of every sweep, contender-major."""
        return [(m, b, c) for c, keys in self.contenders.items() for m in keys.get("models", self.models)
                for b in map(int, keys.get("batches", self.batches))]

    def rates(self, contender: str) -> dict[str, list[float | None]]:
        keys = self.contenders[contender]
        adamw = keys.get("muon_adamw_lrs", RunConfig().muon_adamw_lrs) if keys["optimizer"] in MUON_BASED else [None]
        return {"lr": sorted(float(v) for v in keys["lrs"]), "adamw_lr": sorted(adamw, key=lambda v: v or 0)}

    def grid(self, group: tuple[str, int, str], rates: dict[str, list], seeds: Sequence[int]) -> list[Job]:
        return [Job(*group, lr, adamw_lr, seed) for lr in rates["lr"] for adamw_lr in rates["adamw_lr"]
                for seed in seeds]

    def sweep(self) -> list[Job]:
        return [job for group in self.groups() for job in self.grid(group, self.rates(group[2]), self.seeds)]

    def folder(self, job: Job) -> Path:
        return self.root / job.name

    def config(self, job: Job) -> RunConfig:
        """The job's RunConfig: common < batch < contender keys < the job's own."""
        keys = {k: v for k, v in self.contenders[job.contender].items()
                if k not in ("optimizer", "lrs", *STAGE_KEYS, *SCOPE_KEYS)}
        optimizer = self.contenders[job.contender]["optimizer"]
        values = {**self.common, **self.batches[job.batch], **keys, "model": job.model, "batch": job.batch,
                  "optimizers": [optimizer], "lrs": {optimizer: [job.lr]}, "seeds": [job.seed], "threads": 1,
                  "targets": self.targets, "output": str(self.folder(job))}
        if job.adamw_lr is not None:
            values["muon_adamw_lrs"] = [job.adamw_lr]
        values = coerce_config(values, f"plan {self.path} (job {job.name})")
        steps = values["train_samples"] // job.batch if values.get("train_samples") else values.get(
            "steps", RunConfig().steps)
        values["eval_every"] = max(1, steps // self.evals)
        values["probe_every"] = max(1, steps // self.probes) if self.probes else 0
        return config_from(values)


def command(plan: Plan, job: Job) -> list[str]:
    """The ``mlfop-bench`` command that starts (or, for an interrupted folder, resumes) ``job``."""
    base = [sys.executable, "-m", "mlfop.bench.cli", "run"]
    if folder_state(plan.folder(job)) == "interrupted":
        return [*base, "--resume", "--output", str(plan.folder(job))]
    config, defaults = plan.config(job), RunConfig()
    argv = []
    for key, value in config.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if value == getattr(defaults, key):
            continue
        if key in ("lrs", "targets"):
            argv += [part for name, v in value.items()
                     for part in (flag, f"{name}=" + (",".join(map(repr, v)) if key == "lrs" else repr(v)))]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return [*base, *argv]


class Study:
    """The jobs a plan asks for now, from what its folders hold (finished runs are read once)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.finals: dict[Job, list[dict[str, Any]]] = {}

    def finished(self, job: Job) -> bool:
        """Whether the job's folder holds its finished run (a run of another configuration there
        is an error: the plan changed under a root that holds results)."""
        folder = self.plan.folder(job)
        if job not in self.finals and folder_state(folder) == "finished":
            held = json.loads((folder / "config.json").read_text())
            wanted = json.loads(json.dumps(self.plan.config(job).validate().to_dict()))
            changed = sorted(k for k in wanted if k != "output" and held.get(k, SAVED_DEFAULTS[k]) != wanted[k])
            if changed:
                raise BenchError(f"{folder} holds a run of another configuration ({', '.join(changed)} differ); "
                                 f"accepted: the plan that made it, or another root or contender name")
            self.finals[job] = load_finals([str(folder)], self.plan.targets)[0]
        return job in self.finals

    def pending(self) -> list[Job]:
        """Every job that may run now: the unfinished jobs of each group's current stage."""
        return [job for group in self.plan.groups() for job in self._stage(group)]

    def _stage(self, group: tuple[str, int, str]) -> list[Job]:
        contender = group[2]
        rates, widened = self.plan.rates(contender), Counter()
        while True:
            grid = self.plan.grid(group, rates, self.plan.seeds)
            missing = [job for job in grid if not self.finished(job)]
            if missing:
                return missing
            sweep = best_rates(aggregate([final for job in grid for final in self.finals[job]]))[0]
            grown = False
            for axis, side in sweep["edges"].items():
                if widened[axis, side] < self.plan.stage(contender, "widen"):
                    rates[axis] = sorted(rates[axis] + [_beyond(rates[axis], side)])
                    widened[axis, side] += 1
                    grown = True
            if not grown:
                best = sweep["best"]
                chosen = {"lr": [best["lr"]], "adamw_lr": [best["adamw_lr"]]}
                return [job for job in self.plan.grid(group, chosen, self.plan.stage(contender, "extra_seeds"))
                        if not self.finished(job)]


TABLES, LISTS = ("batches", "contenders", "common", "targets"), ("models", "seeds", "extra_seeds")
CONTENDER_LISTS = ("lrs", "muon_adamw_lrs", "models", "batches", "extra_seeds")


def _check_shapes(plan: dict[str, Any], path: str) -> None:
    """Refuse a plan (or an override) whose tables or lists hold another kind of value."""
    wrong = [key for key in TABLES if not isinstance(plan.get(key, {}), dict)]
    wrong += [key for key in LISTS if not isinstance(plan.get(key, []), list)]
    for group in ("batches", "contenders"):
        for name, keys in (plan.get(group) if isinstance(plan.get(group), dict) else {}).items():
            if not isinstance(keys, dict):
                wrong.append(f"{group}.{name}")
            elif group == "contenders":
                wrong += [f"contenders.{name}.{k}" for k in CONTENDER_LISTS if not isinstance(keys.get(k, []), list)]
    if wrong:
        raise BenchError(f"plan {path}: {', '.join(wrong)} of the wrong kind; accepted: tables for "
                         f"{', '.join(TABLES)} and each batch and contender, lists for {', '.join(LISTS)} and a "
                         f"contender's {', '.join(CONTENDER_LISTS)}")


def _override(plan: dict[str, Any], override: str, path: str) -> None:
    """Set ``plan[a][b]...[key] = value`` from ``a.b...key=value`` (a TOML value) in place."""
    dotted, equals, text = override.partition("=")
    keys = dotted.strip().split(".")
    try:
        value = tomllib.loads(f"value = {text}")["value"] if equals else None
    except tomllib.TOMLDecodeError:
        value = None
    if value is None or not all(keys):
        raise BenchError(f"--set {override!r}: expected KEY=VALUE, KEY a dotted plan key and VALUE a TOML value "
                         "(parallel=1, contenders.mlfop.lrs=[0.01], common.clip=0.0)")
    table = plan
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(table.get(key), dict):
            raise BenchError(f"--set {override!r}: plan {path} has no table {'.'.join(keys[:depth + 1])}; "
                             f"accepted: {', '.join(k for k, v in table.items() if isinstance(v, dict)) or 'none'}")
        table = table[key]
    table[keys[-1]] = value


def _beyond(values: list[float], side: str) -> float:
    """The next rate past the lowest or highest, at the ratio of the two outermost (3 digits)."""
    low, high = (values[0], values[1]) if side == "lowest" else (values[-1], values[-2])
    return float(f"{low * low / high:.3g}")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(plan: Plan, only: str, dry_run: bool) -> int:
    """Run the plan's jobs until none is left (or all left failed); returns the exit code."""
    study = Study(plan)
    running: dict[Job, tuple[subprocess.Popen, float]] = {}
    failed: dict[Job, int] = {}
    changed, finished, elsewhere = True, 0, set()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_MININTERVAL": str(PROGRESS_SECONDS)}
    try:
        while True:
            if changed:
                ready = [job for job in study.pending() if job not in running and job not in failed
                         and fnmatch.fnmatch(job.name, only)]
                elsewhere = {job for job in ready if folder_state(plan.folder(job)) == "running"}
                ready = [job for job in ready if job not in elsewhere]
                changed = False
                if dry_run:
                    print("\n".join(shlex.join(command(plan, job)) for job in ready) or "nothing to run now")
                    return 0
            while ready and len(running) < plan.parallel:
                job = ready.pop(0)
                argv, log = command(plan, job), plan.folder(job).with_name(plan.folder(job).name + ".log")
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a") as handle:
                    handle.write(f"$ {shlex.join(argv)}\n")
                    handle.flush()
                    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
                running[job] = process, time.perf_counter()
                _log(f"start {job.name}" + (" (resume)" if "--resume" in argv else ""))
            if not running:
                break
            time.sleep(POLL_SECONDS)
            for job, (process, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[job]
                changed = True
                if process.returncode == 0:
                    finished += 1
                    _log(f"done {job.name} ({time.perf_counter() - started:.0f} s)")
                else:
                    failed[job] = process.returncode
                    _log(f"FAILED {job.name}: exit code {process.returncode}; see {plan.folder(job)}.log")
    except KeyboardInterrupt:
        for process, _ in running.values():  # not SIGINT: jobs of a driver started with `&` ignore it
            process.send_signal(signal.SIGTERM)
        for job, (process, _) in running.items():
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
        _log(f"stopped: {finished} jobs done, {len(running)} interrupted (resumable); run the same command "
             "to continue")
        return 130
    if elsewhere:
        _log(f"{len(elsewhere)} jobs are being run by another process; run again once they end")
    left = len(failed) + len(elsewhere)
    _log(f"{finished} jobs done, {len(failed)} failed" + ("" if left else "; the plan is complete")
         + f". Tables and figures: mlfop-bench report {shlex.quote(str(plan.root))} --output "
         f"{shlex.quote(str(plan.root))}-report")
    return 1 if failed else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="the study plan, TOML or YAML")
    parser.add_argument("--only", default="*", metavar="GLOB", help="run only the jobs whose name matches")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the jobs that could start now")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a plan key: a dotted path and a TOML value (contenders.mlfop.lrs=[0.01])")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(Plan(args.plan, args.overrides), args.only, args.dry_run)
    except BenchError as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
