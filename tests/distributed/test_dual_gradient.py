"""Dual-gradient groups (4 gloo ranks): the even and the odd ranks' halves of the batch as the two
untagged streams, taken by a DDP communication hook, against one process that folds the same
two halves of the global batch as the streams "even" and "odd"."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from rank_spawn import assert_same_on_every_rank, run_ranks, scenario_results
from test_ddp_folding import _model, _params, _relative
from torch.nn.parallel import DistributedDataParallel as DDP

import mlfop
from mlfop.distributed import DualGradientGroups

WORLD, MICRO, STEPS = 4, 2, 5
_FLOORS = 10.0


def _options():
    # No noise estimate: each group is one sample of its stream here.
    return {"streams": None, "lr": 1e-2, "precondition_frequency": 2, "noise_shrinkage": False}


def _micro_batches(step: int):
    """Per rank, its micro-batches (x, y); even and odd ranks' data pull apart."""
    gen = torch.Generator().manual_seed(700 + step)
    out = []
    for rank in range(WORLD):
        shift = 1.0 if rank % 2 == 0 else -1.0
        out.append([(x, shift * x.flip(1) + 0.1 * torch.randn(4, 8, generator=gen))
                    for x in [torch.randn(4, 8, generator=gen) for _ in range(MICRO)]])
    return out


def _single_process(order, alternate: bool = False) -> list[torch.Tensor]:
    """One process folding the even ranks' micro-batches as "even" and the odd ones' as "odd"
    (``alternate``: untagged folds alternating per micro-batch, which mixes the halves)."""
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters(), **_options())
    for step in range(STEPS):
        ranks = _micro_batches(step)
        for rank in order:
            for x, y in ranks[rank]:
                (model(x) - y).pow(2).mean().div(MICRO * WORLD).backward()
                opt.fold(None if alternate else "even" if rank % 2 == 0 else "odd")
        opt.step()
        opt.zero_grad()
    return _params(model)


def _train(rank: int) -> dict:
    model = _model()
    ddp = DDP(model)
    opt = mlfop.MLFOPSOAP(model.parameters(), **_options())
    DualGradientGroups(opt).register(ddp)
    sent = []
    original = dist.all_reduce

    def counting(tensor, *args, group=None, **kw):
        sent.append((tensor.numel(), dist.get_world_size(group)))
        return original(tensor, *args, group=group, **kw)

    for step in range(STEPS):
        for j, (x, y) in enumerate(_micro_batches(step)[rank]):
            with contextlib.nullcontext() if j == MICRO - 1 else ddp.no_sync():
                if step == STEPS - 1 and j == MICRO - 1:
                    dist.all_reduce = counting
                try:
                    (ddp(x) - y).pow(2).mean().div(MICRO).backward()
                finally:
                    dist.all_reduce = original
        opt.step()
        opt.zero_grad()
    return {"params": _params(model), "sent": sent}


def _refused(rank: int) -> dict:
    errors = {}
    model = _model()
    for name, streams in (("named", ("image", "text")),):
        try:
            DualGradientGroups(mlfop.MLFOPSOAP(model.parameters(), streams=streams))
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


SCENARIOS = {"train": _train, "refused": _refused}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("dual"), world=WORLD)


def test_dual_gradient_groups_match_the_single_process_two_sub_batch_streams(ranks):
    outcomes = scenario_results(ranks, "train")
    assert_same_on_every_rank(outcomes)
    start = _params(_model())
    reference = _single_process(range(WORLD))
    floor = _relative(_single_process([1, 0, 3, 2]), reference, start)
    distance = _relative(outcomes[0]["params"], reference, start)
    print(f"dual-gradient groups: floor {floor:.2e}, ddp-vs-single {distance:.2e} (of the displacement)")
    assert distance <= max(_FLOORS * floor, 1e-6)
    # The comparison can fail: the same data folded alternately per micro-batch is far away.
    assert _relative(_single_process(range(WORLD), alternate=True), reference, start) > 100 * max(floor, distance)
    parameters = sum(p.numel() for p in start)
    for outcome in outcomes:  # one all-reduce over all ranks, of both streams
        assert outcome["sent"] == [(2 * parameters, WORLD)]


def test_dual_gradient_groups_refuse_named_streams(ranks):
    for errors in scenario_results(ranks, "refused"):
        assert "streams=None" in errors["named"]
