"""One training run: the same loop for every optimizer, with evaluation, logging and checkpoints.

Each step accumulates the global batch from per-stream micro-batches (one backward each, then the
contender's gradient route, e.g. ML-FOP-SOAP's ``fold``), clips the gradient norm (unless
``clip`` is 0), steps the optimizers and their warm-up + cosine schedules. A step whose stream
loss is non-finite stops the run as diverged, and so does a stream loss above ``diverge_factor``
times that stream's first for ``diverge_patience`` consecutive steps. Every ``eval_every`` steps
(and at the start and the end) it evaluates on the held-out split and saves a checkpoint; every
``probe_every`` steps (and at the first) it records the streams' per-layer heterogeneity
(:mod:`mlfop.bench.heterogeneity`). A resumed run restarts from the last checkpoint and, since
batches are a function of ``(seed, step)``, ends with exactly the metrics of an uninterrupted run
(timings aside).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from mlfop.bench.config import RunConfig
from mlfop.bench.data import DigitsData, derived_seed
from mlfop.bench.heterogeneity import StreamProbe
from mlfop.bench.metrics import divergence, evaluate, run_flags, time_to_targets
from mlfop.bench.models import TinyModel, build_model
from mlfop.bench.objective import StepPlan, stream_nll
from mlfop.bench.optimizers import Contender, build_contender
from mlfop.bench.runfolder import RunFolder, kill_point

__all__ = ["RunSpec", "start", "train", "train_step", "lr_factor"]


@dataclass(frozen=True)
class RunSpec:
    """One optimizer at one learning rate (Muon: and one rate of its AdamW part) and seed."""

    optimizer: str
    lr: float
    seed: int
    adamw_lr: float | None = None

    @property
    def name(self) -> str:
        part = "" if self.adamw_lr is None else f"-adamw{self.adamw_lr:g}"
        return f"{self.optimizer}-lr{self.lr:g}{part}-s{self.seed}"


def lr_factor(step: int, warmup: int, steps: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def start(spec: RunSpec, config: RunConfig, data: DigitsData, plan: StepPlan
          ) -> tuple[TinyModel, Contender, list[LambdaLR]]:
    """The run's freshly initialised model (seeded by ``spec.seed``), its contender and their
    warm-up + cosine schedules."""
    torch.manual_seed(spec.seed)
    model = build_model(config.model, config.model_config, data.tokenizer.codes, data.tokenizer.tokens)
    contender = build_contender(spec.optimizer, model, spec.lr, config, plan.shares, spec.adamw_lr)
    warmup = max(1, round(config.warmup_fraction * config.steps))
    schedule = partial(lr_factor, warmup=warmup, steps=config.steps, floor=config.min_lr_fraction)
    return model, contender, [LambdaLR(optimizer, schedule) for optimizer in contender.optimizers]


def train(spec: RunSpec, config: RunConfig, data: DigitsData, plan: StepPlan, refs: dict[str, float],
          folder: RunFolder, resume: bool) -> dict[str, Any]:
    """Train one run (or finish it from its checkpoint) and return its final record."""
    model, contender, schedulers = start(spec, config, data, plan)
    probe = StreamProbe([(n, p) for n, p in model.named_parameters() if p.requires_grad], plan.shares)
    state = folder.load_checkpoint(spec.name) if resume else None
    progress = _restore(state, model, contender, schedulers) if state is not None else {
        "step": 0, "clock": {"train_seconds": 0.0, "train_cpu_seconds": 0.0}, "evals": [], "first_losses": None,
        "stopped": None, "above_line": 0}
    step, clock, evals = progress["step"], progress["clock"], progress["evals"]
    # a killed attempt's records and events after the checkpoint (all of them without one) are redone
    folder.discard_after(spec.name, step if state is not None else -1)
    writer = folder.writer(spec.name, purge_step=step + 1 if state is not None else 0)
    if state is None:
        evals.append(_evaluate(model, data, config, spec, step, clock, folder))
        _log(writer, "eval", evals[0])
    bar = tqdm(total=config.steps, initial=step, desc=spec.name, unit="step", dynamic_ncols=True)
    try:
        while step < config.steps and progress["stopped"] is None:
            probed = config.probe_every > 0 and (step == 0 or (step + 1) % config.probe_every == 0)
            started, cpu_started = time.perf_counter(), time.process_time()
            losses, diagnostics = train_step(model, data, plan, contender, spec.seed, step, config.clip,
                                             probe if probed else None)
            lr = schedulers[0].get_last_lr()[0]
            for scheduler in schedulers:
                scheduler.step()
            clock["train_seconds"] += time.perf_counter() - started
            clock["train_cpu_seconds"] += time.process_time() - cpu_started
            step += 1
            kill_point("step")
            progress["first_losses"] = progress["first_losses"] or losses
            progress["stopped"], progress["above_line"] = divergence(
                losses, progress["first_losses"], config.diverge_factor, config.diverge_patience,
                progress.get("above_line", 0))  # checkpoints before diverge_patience lack the streak
            record = {"kind": "train", "run": spec.name, "step": step, "lr": lr, **clock, **losses, **diagnostics}
            folder.append(record)
            _log(writer, "train", record)
            if probed:
                folder.append({"kind": "probe", "run": spec.name, "step": step, **probe.summary()})
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)  # drawn by the update
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps or progress["stopped"]:
                evals.append(_evaluate(model, data, config, spec, step, clock, folder))
                _log(writer, "eval", evals[-1])
                progress["step"] = step
                folder.save_checkpoint(spec.name, _checkpoint(model, contender, schedulers, progress))
    finally:  # also on Ctrl-C: the bar ends its line, the events are flushed
        bar.close()
        writer.close()
    return _final(spec, config, model, refs, evals, clock, step, progress["stopped"], folder)


def _checkpoint(model: TinyModel, contender: Contender, schedulers: list[LambdaLR], progress: dict[str, Any]
                ) -> dict[str, Any]:
    """Everything a resumed run needs: the model, optimizers, schedules, route and ``progress``
    (step, clocks, evaluations so far, first losses, why it stopped)."""
    return {"model": model.state_dict(), "optimizers": [o.state_dict() for o in contender.optimizers],
            "schedulers": [s.state_dict() for s in schedulers], "route": contender.route.state_dict(),
            "progress": progress}


def _restore(state: dict[str, Any], model: TinyModel, contender: Contender, schedulers: list[LambdaLR]
             ) -> dict[str, Any]:
    """Load a :func:`_checkpoint` into the run's parts; returns its ``progress``."""
    model.load_state_dict(state["model"])
    for part, saved in zip([*contender.optimizers, *schedulers], state["optimizers"] + state["schedulers"]):
        part.load_state_dict(saved)
    contender.route.load_state_dict(state["route"])
    return state["progress"]


def train_step(model: TinyModel, data: DigitsData, plan: StepPlan, contender: Contender, seed: int, step: int,
               clip: float, probe: StreamProbe | None) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step over the planned micro-batches; mean train NLL per token of each stream."""
    route, params = contender.route, model.trainable_parameters()
    sums = dict.fromkeys(plan.scales, 0.0)
    if probe is not None:
        probe.start()
    for stream, index in plan.micro:
        nll = stream_nll(model, stream, data.micro_batch(seed, step, stream, index, plan.size))
        (plan.scales[stream] * nll).backward()
        if probe is not None:
            probe.collect(stream)
        route.after_backward(stream, plan.tokens[stream])
        if probe is not None:
            probe.rebase()
        sums[stream] += float(nll.detach())
    losses = {k: sums[k] / plan.step_tokens[k] for k in sums}
    route.finish(losses)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
    for optimizer in contender.optimizers:
        optimizer.step()
    for optimizer in contender.optimizers:
        optimizer.zero_grad()
    route.after_step(partial(_losses, model, data, plan, seed, step))
    return {f"loss_{k}": v for k, v in losses.items()}, {"grad_norm": grad_norm, **route.diagnostics()}


@torch.no_grad()
def _losses(model: TinyModel, data: DigitsData, plan: StepPlan, seed: int, step: int) -> dict[str, float]:
    """The mean NLL per token of each stream on the micro-batches of ``step``, at the current parameters."""
    sums = dict.fromkeys(plan.scales, 0.0)
    for stream, index in plan.micro:
        sums[stream] += float(stream_nll(model, stream, data.micro_batch(seed, step, stream, index, plan.size)))
    return {k: sums[k] / plan.step_tokens[k] for k in sums}


def _evaluate(model: TinyModel, data: DigitsData, config: RunConfig, spec: RunSpec, step: int,
              clock: dict[str, float], folder: RunFolder) -> dict[str, Any]:
    metrics, images = evaluate(model, data, config.streams, config.samples, derived_seed(spec.seed, step))
    if images is not None:
        folder.write(f"samples/{spec.name}.npy", partial(np.save, arr=images))
    record = {"kind": "eval", "run": spec.name, "step": step, **clock, **metrics}
    folder.append(record)
    return record


def _log(writer, prefix: str, record: dict[str, Any]) -> None:
    for key, value in record.items():
        if isinstance(value, float) and key not in ("train_seconds", "train_cpu_seconds"):
            writer.add_scalar(f"{prefix}/{key}", value, record["step"])


def _final(spec: RunSpec, config: RunConfig, model: TinyModel, refs: dict[str, float], evals: list[dict],
           clock: dict[str, float], step: int, stopped: str | None, folder: RunFolder) -> dict[str, Any]:
    last_train = folder.records("train")
    last_train = next((r for r in reversed(last_train) if r["run"] == spec.name), {})
    final = {
        "kind": "final", "run": spec.name, "optimizer": spec.optimizer, "lr": spec.lr, "seed": spec.seed,
        **({"adamw_lr": spec.adamw_lr} if spec.adamw_lr is not None else {}),
        "step": step, "model": config.model, "tokenizer": config.tokenizer, "batch": config.batch,
        "micro_batch": config.micro_batch, **model.parameter_counts(), **clock,
        "seconds_per_step": clock["train_seconds"] / max(step, 1),
        **{k: v for k, v in evals[-1].items() if k not in ("kind", "run", "step", *clock)},
        **{k: v for k, v in last_train.items() if k.startswith("loss_")},
        **time_to_targets(evals, config.targets, config.batch), **run_flags(evals, refs, stopped, last_train),
        "diverged_step": step if stopped else None,
    }
    folder.append(final)
    kill_point("final")
    return final
