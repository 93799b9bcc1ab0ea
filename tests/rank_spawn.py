"""Run a test module's scenarios on several gloo ranks, spawned by the test, and collect their results.

The ranks rendezvous over TCP on 127.0.0.1 at a free port (``env://``, so that engines such as
accelerate find the usual ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables). Each rank runs the
named entries of the module's ``SCENARIOS`` (``name -> function(rank) -> dict``) in one process
group and saves its results with ``torch.save``; the parent returns them per rank. A crash is
recorded with its traceback and stops that rank's scenarios (the ranks may be out of lockstep).
A hang fails the test: collectives time out, and the ranks are killed after ``timeout_s``.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60  # gloo gives up on a collective that another rank never joins


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, module: str, scenarios: list[str], world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # the ranks share a small CPU
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    table = importlib.import_module(module).SCENARIOS
    results = {}
    try:
        for name in scenarios:
            try:
                results[name] = table[name](rank)
            except Exception:  # recorded, so that the parent reports it with the rank
                results[name] = {"crash": traceback.format_exc()}
                break
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def run_ranks(module: str, scenarios: list[str], folder: Path, world: int = 2, timeout_s: float = 240.0) -> list[dict]:
    """Every rank's ``{scenario: result}``; fails the test if the ranks take over ``timeout_s``."""
    context = mp.spawn(_worker, args=(module, scenarios, world, free_port(), str(folder)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(10)
            pytest.fail(f"the ranks did not finish {scenarios} within {timeout_s:.0f} s (hang?)")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def scenario_results(ranks: list[dict], name: str) -> list[dict]:
    """Scenario ``name``'s result on every rank; fails with the rank's traceback if it crashed."""
    found = []
    for rank, results in enumerate(ranks):
        assert name in results, f"rank {rank} never ran {name} (an earlier scenario crashed)"
        assert "crash" not in results[name], f"rank {rank}, {name}:\n{results[name]['crash']}"
        found.append(results[name])
    return found


def attempt_step(opt, snapshot) -> dict:
    """``opt.step()`` where it should be refused: the ``ValueError``'s message (``None`` if it
    stepped), the seconds it took (a refusal must not wait in a collective), and whether
    ``snapshot()`` (parameters and state) is unchanged."""
    before = snapshot()
    start = time.perf_counter()
    error = None
    try:
        opt.step()
    except ValueError as exc:
        error = str(exc)
    elapsed = time.perf_counter() - start
    unchanged = all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    return {"error": error, "elapsed": elapsed, "unchanged": unchanged}

