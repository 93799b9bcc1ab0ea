"""One training run: the same loop for every optimizer, with evaluation, logging and checkpoints.

Each step accumulates the global batch from per-stream micro-batches (one backward each, then the
optimizer's gradient route, e.g. ML-FOP-SOAP's ``fold``), clips the gradient norm, steps the
optimizer and the warm-up + cosine schedule. Every ``eval_every`` steps (and at the start and the
end) it evaluates on the held-out split and saves a checkpoint; a resumed run restarts from the
last checkpoint and, since batches are a function of ``(seed, step)``, ends with exactly the
metrics of an uninterrupted run (timings aside).
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
from mlfop.bench.metrics import evaluate, run_flags, time_to_targets
from mlfop.bench.models import TinyModel, build_model
from mlfop.bench.objective import StepPlan, stream_nll
from mlfop.bench.optimizers import build_optimizer
from mlfop.bench.runfolder import RunFolder

__all__ = ["RunSpec", "train", "lr_factor"]


@dataclass(frozen=True)
class RunSpec:
    """One optimizer at one learning rate and seed."""

    optimizer: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-lr{self.lr:g}-s{self.seed}"


def lr_factor(step: int, warmup: int, steps: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(spec: RunSpec, config: RunConfig, data: DigitsData, plan: StepPlan, refs: dict[str, float],
          folder: RunFolder, resume: bool) -> dict[str, Any]:
    """Train one run (or finish it from its checkpoint) and return its final record."""
    torch.manual_seed(spec.seed)
    model = build_model(config.model, config.model_config, data.tokenizer.codes, data.tokenizer.tokens)
    params = model.trainable_parameters()
    optimizer, route = build_optimizer(spec.optimizer, model, spec.lr, config)
    warmup = max(1, round(config.warmup_fraction * config.steps))
    scheduler = LambdaLR(optimizer, partial(lr_factor, warmup=warmup, steps=config.steps,
                                            floor=config.min_lr_fraction))
    state = folder.load_checkpoint(spec.name) if resume else None
    if state is None:
        step, clock, evals = 0, {"train_seconds": 0.0, "train_cpu_seconds": 0.0}, []
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, clock, evals = state["step"], state["clock"], state["evals"]
    # a killed attempt's records and events after the checkpoint (all of them without one) are redone
    folder.discard_after(spec.name, step if state is not None else -1)
    writer = folder.writer(spec.name, purge_step=step + 1 if state is not None else 0)
    if state is None:
        evals.append(_evaluate(model, data, config, spec, step, clock, folder))
        _log(writer, "eval", evals[0])
    nonfinite = False
    bar = tqdm(total=config.steps, initial=step, desc=spec.name, unit="step", dynamic_ncols=True)
    while step < config.steps and not nonfinite:
        started, cpu_started = time.perf_counter(), time.process_time()
        losses, diagnostics = _step(model, data, plan, route, optimizer, params, spec.seed, step, config.clip)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        clock["train_seconds"] += time.perf_counter() - started
        clock["train_cpu_seconds"] += time.process_time() - cpu_started
        step += 1
        nonfinite = not all(math.isfinite(v) for v in losses.values())
        record = {"kind": "train", "run": spec.name, "step": step, "lr": lr, **clock, **losses, **diagnostics}
        folder.append(record)
        _log(writer, "train", record)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if step % config.eval_every == 0 or step == config.steps or nonfinite:
            evals.append(_evaluate(model, data, config, spec, step, clock, folder))
            _log(writer, "eval", evals[-1])
            folder.save_checkpoint(spec.name, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                               "scheduler": scheduler.state_dict(), "step": step,
                                               "clock": clock, "evals": evals})
    bar.close()
    writer.close()
    return _final(spec, config, model, refs, evals, clock, step, nonfinite, folder)


def _step(model: TinyModel, data: DigitsData, plan: StepPlan, route, optimizer, params, seed: int, step: int,
          clip: float) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step over the planned micro-batches; mean train NLL per token of each stream."""
    sums = dict.fromkeys(plan.scales, 0.0)
    counts = dict.fromkeys(plan.scales, 0)
    for stream, index in plan.micro:
        nll = stream_nll(model, stream, data.micro_batch(seed, step, stream, index, plan.size))
        (plan.scales[stream] * nll).backward()
        route.after_backward(stream, plan.tokens[stream])
        sums[stream] += float(nll.detach())
        counts[stream] += plan.tokens[stream]
    route.finish()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
    optimizer.step()
    optimizer.zero_grad()
    return {f"loss_{k}": sums[k] / counts[k] for k in sums}, {"grad_norm": grad_norm, **route.diagnostics()}


def _evaluate(model: TinyModel, data: DigitsData, config: RunConfig, spec: RunSpec, step: int,
              clock: dict[str, float], folder: RunFolder) -> dict[str, Any]:
    metrics, images = evaluate(model, data, config.streams, config.samples, derived_seed(spec.seed, step))
    if images is not None:
        np.save(folder.sample_path(spec.name), images)
    record = {"kind": "eval", "run": spec.name, "step": step, **clock, **metrics}
    folder.append(record)
    return record


def _log(writer, prefix: str, record: dict[str, Any]) -> None:
    for key, value in record.items():
        if isinstance(value, float) and key not in ("train_seconds", "train_cpu_seconds"):
            writer.add_scalar(f"{prefix}/{key}", value, record["step"])


def _final(spec: RunSpec, config: RunConfig, model: TinyModel, refs: dict[str, float], evals: list[dict],
           clock: dict[str, float], step: int, nonfinite: bool, folder: RunFolder) -> dict[str, Any]:
    last_train = folder.records("train")
    last_train = next((r for r in reversed(last_train) if r["run"] == spec.name), {})
    final = {
        "kind": "final", "run": spec.name, "optimizer": spec.optimizer, "lr": spec.lr, "seed": spec.seed,
        "step": step, "model": config.model, "tokenizer": config.tokenizer, "batch": config.batch,
        "micro_batch": config.micro_batch, **model.parameter_counts(), **clock,
        "seconds_per_step": clock["train_seconds"] / max(step, 1),
        **{k: v for k, v in evals[-1].items() if k not in ("kind", "run", "step", *clock)},
        **{k: v for k, v in last_train.items() if k.startswith("loss_")},
        **time_to_targets(evals, config.targets), **run_flags(evals, refs, nonfinite),
    }
    folder.append(final)
    return final
