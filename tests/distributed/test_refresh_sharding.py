"""``shard_refresh=True`` under DDP (2 gloo ranks): each block's eigenbasis refresh runs on one
rank and is shared, and the run equals the unsharded one bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch
from rank_spawn import run_ranks, scenario_results
from test_ddp_folding import STREAM_ORDER, _model, _params
from torch.nn.parallel import DistributedDataParallel as DDP

import mlfop
import mlfop.distributed

WORLD, MICRO, STEPS = 2, 4, 6


def _run(rank: int, kind: str, shard_refresh: bool) -> dict:
    model = _model()
    ddp = DDP(model)
    options = {"lr": 1e-2, "precondition_frequency": 2, "shard_refresh": shard_refresh}
    opt = mlfop.SOAP(model.parameters(), **options) if kind == "soap" else mlfop.MLFOPSOAP(model.parameters(), **options)
    refreshed = []
    original = mlfop.distributed.power_iteration_basis

    def counting(factors, bases):
        refreshed.append(factors.shape[0])
        return original(factors, bases)

    mlfop.distributed.power_iteration_basis = counting
    try:
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(100 * step + rank)
            for j in range(MICRO):
                x = torch.randn(4, 8, generator=gen)
                y = (1.0 if STREAM_ORDER[j] == "image" else -1.0) * x.flip(1)
                with contextlib.nullcontext() if j == MICRO - 1 else ddp.no_sync():
                    (ddp(x) - y).pow(2).mean().div(MICRO).backward()
                if kind == "mlfop":
                    opt.fold(STREAM_ORDER[j])
            opt.step()
            opt.zero_grad()
    finally:
        mlfop.distributed.power_iteration_basis = original
    return {"params": _params(model), "refreshed": sum(refreshed),
            "state": [v.clone() for p in model.parameters() for _, v in sorted(opt.state[p].items())]}


SCENARIOS = {f"{kind}_{sharded}": (lambda rank, kind=kind, sharded=sharded: _run(rank, kind, sharded == "sharded"))
             for kind in ("soap", "mlfop") for sharded in ("sharded", "replicated")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("refresh"))


@pytest.mark.parametrize("kind", ["soap", "mlfop"])
def test_sharded_refresh_divides_the_work_and_changes_nothing(ranks, kind):
    sharded, replicated = scenario_results(ranks, f"{kind}_sharded"), scenario_results(ranks, f"{kind}_replicated")
    # 3 weights with 2 rotated dimensions each, refreshed at steps 2 and 4: 12 block refreshes in all.
    assert [outcome["refreshed"] for outcome in sharded] == [6, 6]
    assert [outcome["refreshed"] for outcome in replicated] == [0, 0]  # (the local path)
    for rank in range(WORLD):
        for a, b in zip(sharded[rank]["params"] + sharded[rank]["state"],
                        replicated[rank]["params"] + replicated[rank]["state"]):
            assert torch.equal(a, b), f"{kind}, rank {rank}: the sharded refresh changed the run"
