"""Time the distributed optimizer step on 2-4 CPU ranks (gloo): ``python benchmarks/distributed_step_time.py``.

Each rank builds the same stack of square linear layers; the modes (DDP or FSDP2's
``fully_shard``, with ``mlfop.SOAP`` or ``mlfop.MLFOPSOAP`` folding two streams) are set up
side by side and timed interleaved, round by round in a rotated order, so that machine load
hits all alike. Per step: ``--accumulation`` micro-batches (DDP: ``no_sync()`` on all but the
last; FSDP2: its default sync after each, which folding needs), then ``opt.step()``. Rank 0
prints a Markdown table of the medians over the rounds (the slowest rank's time per round), the
mean step (which counts the refresh every ``--precondition-frequency`` steps; ``shard_refresh``
divides it over the ranks) and ratios to DDP + SOAP. These are CPU timings on a shared machine: they compare the modes
with each other here and say nothing about a GPU cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mlfop

MODES = ("ddp+soap", "ddp+mlfop", "ddp+soap+shard_refresh", "ddp+mlfop+shard_refresh", "fsdp2+soap", "fsdp2+mlfop")


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[module for _ in range(layers) for module in (nn.Linear(width, width), nn.Tanh())])


def _setup(mode: str, args: argparse.Namespace):
    """``(module to call, optimizer, whether to fold, micro-batch context)`` of one mode."""
    model = _model(args.width, args.layers)
    wrapper, sync_each = model, False
    if mode.startswith("ddp"):
        wrapper = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        sync_each = True
    params = list(model.parameters())
    fold = "mlfop" in mode
    options = {"lr": 1e-3, "precondition_frequency": args.precondition_frequency,
               "shard_refresh": mode.endswith("shard_refresh")}
    opt = mlfop.MLFOPSOAP(params, **options) if fold else mlfop.SOAP(params, **options)

    def context(last: bool):
        return contextlib.nullcontext() if sync_each or last else wrapper.no_sync()

    return wrapper, opt, fold, context


def _train_step(setup, args: argparse.Namespace, generator: torch.Generator) -> tuple[float, float]:
    """Seconds of one accumulation and of the ``step()`` that follows."""
    wrapper, opt, fold, context = setup
    start = time.perf_counter()
    for j in range(args.accumulation):
        x = torch.randn(args.micro_batch, args.width, generator=generator)
        with context(j == args.accumulation - 1):
            wrapper(x).square().mean().backward()
        if fold:
            opt.fold(("image", "text")[j % 2])
    middle = time.perf_counter()
    opt.step()
    opt.zero_grad()
    return middle - start, time.perf_counter() - middle


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    generator = torch.Generator().manual_seed(rank)
    setups = {mode: _setup(mode, args) for mode in args.modes}
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            accumulate, step = _train_step(setups[mode], args, generator)
            slowest = torch.tensor([accumulate, step], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if round_index >= args.warmup:
                times[mode].append(tuple(slowest.tolist()))
    if rank == 0:
        _print_table(times, world, args)
    del setups  # free DDP's reducer and FSDP2's state before their process group goes
    dist.barrier()
    dist.destroy_process_group()


def _print_table(times: dict[str, list[tuple[float, float]]], world: int, args: argparse.Namespace) -> None:
    base = statistics.median(s for _, s in times[args.modes[0]])
    base_total = statistics.median(a + s for a, s in times[args.modes[0]])
    print(f"{world} gloo ranks (CPU, one thread each), {args.layers} x Linear({args.width}, {args.width}), "
          f"{args.accumulation} micro-batches of {args.micro_batch} per rank and step, {args.rounds} rounds; "
          f"ratios to {args.modes[0]}")
    base_mean = statistics.mean(s for _, s in times[args.modes[0]])
    print("| mode | accumulate ms | step ms | mean step ms | train step ms | step ratio | mean step ratio "
          "| train step ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        accumulate = statistics.median(a for a, _ in times[mode])
        step = statistics.median(s for _, s in times[mode])
        mean = statistics.mean(s for _, s in times[mode])
        total = statistics.median(a + s for a, s in times[mode])
        print(f"| {mode} | {1e3 * accumulate:.2f} | {1e3 * step:.2f} | {1e3 * mean:.2f} | {1e3 * total:.2f} "
              f"| {step / base:.2f} | {mean / base_mean:.2f} | {total / base_total:.2f} |")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="rank counts to time")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precondition-frequency", type=int, default=10)
    args = parser.parse_args(argv)
    for world in args.world:
        mp.spawn(_worker, args=(world, _free_port(), args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
