"""Mixed data under DDP (2 gloo ranks): ``fold_losses`` on micro-batches that mix K = 3 streams,
and a hand loop over ``StreamBatchSampler``, each against one process on the global batch.

The model is test_ddp_folding's 8x8 network in float64, where the rounding floor of the
comparison is about 1e-14 of the displacement; a wrong fold moves the result by 1e-2 or more.
"""

from __future__ import annotations

import contextlib
import random
import time

import pytest
import torch
from rank_spawn import run_ranks, scenario_results
from test_ddp_folding import _model, _params, _relative
from torch.nn.parallel import DistributedDataParallel as DDP

import mlfop

WORLD, ACCUM, STEPS = 2, 2, 3
STREAMS = ("t2i", "i2t", "text")
# Tags of the rows of each rank's micro-batches (the same every step). The ranks' j-th
# micro-batches hold the same streams (so they fold alike, and the last fold, DDP's sync, is
# "text" on both), in different proportions (so the ranks' token shares differ).
TAGS = [
    [["t2i", "t2i", "i2t", "t2i", "i2t"], ["i2t", "text", "t2i", "text", "t2i", "t2i"]],
    [["i2t", "t2i", "i2t", "i2t"], ["t2i", "i2t", "i2t", "text", "text"]],
]
# Rank 1's last micro-batch without "text": its last fold is "i2t", rank 0's "text".
TAGS_LAST_DIFFERS = [TAGS[0], [TAGS[1][0], ["t2i", "i2t", "i2t", "t2i", "i2t"]]]
REFUSAL_WITHIN_S = 10.0


def _optimizer(params) -> mlfop.MLFOPSOAP:
    # The default noise shrinkage: each rank's synced micro-batch is recorded before DDP's average.
    return mlfop.MLFOPSOAP(params, streams=STREAMS, lr=1e-2, precondition_frequency=2)


def _rows(step: int, tags) -> list[list[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
    """Per rank, its micro-batches (x, y, tags) of this step; the same on every rank and in the parent."""
    gen = torch.Generator().manual_seed(500 + step)
    out = []
    for rank_tags in tags:
        batches = []
        for row_tags in rank_tags:
            x = torch.randn(len(row_tags), 8, generator=gen, dtype=torch.float64)
            shift = torch.tensor([STREAMS.index(t) - 1.0 for t in row_tags], dtype=torch.float64)[:, None]
            batches.append((x, shift * x.flip(1) + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64),
                            row_tags))
        out.append(batches)
    return out


def _fold_losses_on_rank(rank: int, tags=TAGS) -> dict:
    """The documented loop: every forward but the last micro-batch's inside no_sync(); fold_losses."""
    model = _model().double()
    ddp = DDP(model)
    opt = _optimizer(model.parameters())
    error, elapsed = None, 0.0
    for step in range(STEPS):
        per_rank = _rows(step, tags)
        total = sum(len(t) for rank_batches in per_rank for _, _, t in rank_batches)
        own = per_rank[rank]
        for j, (x, y, row_tags) in enumerate(own):
            with contextlib.nullcontext() if j == len(own) - 1 else ddp.no_sync():
                err = (ddp(x) - y).pow(2).mean(dim=1)
                mask = {name: torch.tensor([t == name for t in row_tags]) for name in STREAMS}
                losses = {name: err[m].sum() * (WORLD / total) for name, m in mask.items() if m.any()}
                mlfop.fold_losses(opt, losses, tokens={name: int(mask[name].sum()) for name in losses})
        start = time.perf_counter()
        try:
            opt.step()
        except ValueError as exc:
            error, elapsed = str(exc), time.perf_counter() - start
            break
        opt.zero_grad()
    del ddp
    return {"params": _params(model), "error": error, "elapsed": elapsed}


def _sampler_loop_on_rank(rank: int) -> dict:
    """A hand loop over StreamBatchSampler (ranks from torch.distributed): mean loss per micro-batch."""
    x, y, streams = _dataset()
    sampler = mlfop.StreamBatchSampler(streams, 3, accumulation_steps=ACCUM, seed=4, drop_last=True)
    model = _model().double()
    ddp = DDP(model)
    opt = _optimizer(model.parameters())
    batches = list(sampler)
    for step in range(STEPS):
        for j in range(ACCUM):
            indices = batches[step * ACCUM + j]
            with contextlib.nullcontext() if j == ACCUM - 1 else ddp.no_sync():
                ((ddp(x[indices]) - y[indices]).pow(2).mean() / ACCUM).backward()
            opt.fold(streams[indices[0]])
        opt.step()
        opt.zero_grad()
    del ddp
    return {"params": _params(model), "ranks": (sampler.num_replicas, sampler.rank), "micro_batches": sampler.micro_batches()}


def _dataset():
    rng = random.Random(1)
    streams = rng.choices(STREAMS, weights=(3, 2, 1), k=60)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    shift = torch.tensor([STREAMS.index(s) - 1.0 for s in streams], dtype=torch.float64)[:, None]
    return x, shift * x.flip(1), streams


SCENARIOS = {
    "fold_losses": _fold_losses_on_rank,
    "last_differs": lambda rank: _fold_losses_on_rank(rank, TAGS_LAST_DIFFERS),
    "sampler_loop": _sampler_loop_on_rank,
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("mixed"))


def _separate_micro_batches() -> list[torch.Tensor]:
    """One process, all ranks' examples as single-stream micro-batches, loss over the global rows."""
    model = _model().double()
    opt = _optimizer(model.parameters())
    for step in range(STEPS):
        per_rank = _rows(step, TAGS)
        total = sum(len(t) for rank_batches in per_rank for _, _, t in rank_batches)
        for x, y, row_tags in (batch for rank_batches in per_rank for batch in rank_batches):
            for name in STREAMS:
                rows = torch.tensor([t == name for t in row_tags])
                if rows.any():
                    (model(x[rows]) - y[rows]).pow(2).mean(dim=1).sum().div(total).backward()
                    opt.fold(name, tokens=int(rows.sum()))
        opt.step()
        opt.zero_grad()
    return _params(model)


def test_fold_losses_under_ddp_equals_separate_micro_batches_on_one_process(ranks):
    rank0, rank1 = scenario_results(ranks, "fold_losses")
    assert rank0["error"] is None and rank1["error"] is None
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    start = _params(_model().double())
    distance = _relative(rank0["params"], _separate_micro_batches(), start)
    print(f"fold_losses under DDP vs separate micro-batches on one process: {distance:.2e} of the displacement")
    assert distance < 1e-9


def test_fold_losses_under_ddp_refuses_ranks_that_end_on_different_streams(ranks):
    outcomes = scenario_results(ranks, "last_differs")
    for outcome in outcomes:
        assert outcome["error"] is not None and "ranks folded different streams" in outcome["error"]
        assert outcome["elapsed"] < REFUSAL_WITHIN_S
    assert outcomes[0]["error"] == outcomes[1]["error"]


def test_sampler_hand_loop_under_ddp_matches_one_process(ranks):
    rank0, rank1 = scenario_results(ranks, "sampler_loop")
    assert (rank0["ranks"], rank1["ranks"]) == ((WORLD, 0), (WORLD, 1))  # taken from torch.distributed
    assert [s for s, _ in rank0["micro_batches"]] == [s for s, _ in rank1["micro_batches"]]
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    # One process folds both ranks' micro-batches of each step, each mean over the global micro-batches.
    x, y, streams = _dataset()
    model = _model().double()
    opt = _optimizer(model.parameters())
    for step in range(STEPS):
        for outcome in (rank0, rank1):
            for stream, indices in outcome["micro_batches"][step * ACCUM : (step + 1) * ACCUM]:
                ((model(x[indices]) - y[indices]).pow(2).mean() / (ACCUM * WORLD)).backward()
                opt.fold(stream)
        opt.step()
        opt.zero_grad()
    distance = _relative(rank0["params"], _params(model), _params(_model().double()))
    assert distance < 1e-9, distance
