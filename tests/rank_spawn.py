"""Run a test module's scenarios on several gloo ranks, spawned by the test, and collect their results.

The ranks rendezvous over TCP on 127.0.0.1 at a free port (``env://``, so that engines such as
accelerate find the usual ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables). Each rank runs the
named entries of the module's ``SCENARIOS`` (``name -> function(rank) -> dict``) in one process
group and saves its results with ``torch.save``; the parent returns them per rank. A crash is
recorded with its traceback and stops that rank's scenarios (the ranks may be out of lockstep).
A hang fails the test: collectives time out, and the ranks are killed after ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import shutil
import socket
import sys
import tempfile
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
    # Results saved: leave without the interpreter's teardown, where a C++ thread of the engines
    # (seen once with Lightning's FSDP2 strategy) can abort with "terminate called without an
    # active exception" after the work is done, which the parent would report as a crashed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


@contextlib.contextmanager
def shared_folder(rank: int):
    """A temporary folder that every rank sees (made by rank 0, removed after a barrier)."""
    holder = [tempfile.mkdtemp(prefix="mlfop-ranks-") if rank == 0 else None]
    dist.broadcast_object_list(holder)
    try:
        yield holder[0]
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(holder[0], ignore_errors=True)


def assert_same_on_every_rank(outcomes: list[dict], key: str = "params") -> None:
    """Every rank's ``outcome[key]`` tensors equal rank 0's, bit for bit."""
    for rank, outcome in enumerate(outcomes[1:], start=1):
        for a, b in zip(outcomes[0][key], outcome[key]):
            assert torch.equal(a, b), f"rank {rank}'s {key} differ from rank 0's"


def dcp_resume(rank: int, make, saved_after: int, steps: int, make_resumed=None, on_load=None):
    """Train ``make()``'s ``(model, optimizer, step)`` (``step(t)`` runs optimizer step ``t``),
    save with DCP after ``saved_after`` steps and go on to ``steps``; then build a fresh one
    (``make_resumed``, else ``make``), load the checkpoint into it (``on_load(optimizer)`` right
    after) and run the same remaining steps. Returns both ``(model, optimizer)`` pairs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with shared_folder(rank) as folder:
        model, optimizer, step = make()
        for t in range(saved_after):
            step(t)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
        dist.barrier()
        for t in range(saved_after, steps):
            step(t)
        fresh, resumed, resumed_step = (make_resumed or make)()
        model_state, optim_state = get_state_dict(fresh, resumed)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=folder)
        set_state_dict(fresh, resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        if on_load is not None:
            on_load(resumed)
        for t in range(saved_after, steps):
            resumed_step(t)
    return (model, optimizer), (fresh, resumed)

