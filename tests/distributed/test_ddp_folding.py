"""``MLFOPSOAP`` under DDP (2 ranks, gloo on CPU): equivalence with one process, and refusals.

The ranks are started once per module (:mod:`rank_spawn`). Each rank runs every scenario in
turn in one process group, and the tests compare the results in the parent. A spawn costs a
few seconds, so all scenarios share one.

The loop under DDP is the one the library documents. Per optimizer step each rank runs
``MICRO_PER_RANK`` micro-batches, all but the last inside ``ddp.no_sync()`` (so DDP averages the
accumulated ``p.grad`` at the last backward), and calls ``opt.fold(stream)`` after each backward.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from rank_spawn import attempt_step, dcp_resume, run_ranks, scenario_results
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import mlfop

WORLD = 2
MICRO_PER_RANK = 4
MICRO_GLOBAL = WORLD * MICRO_PER_RANK
STEPS = 5
# Global micro-batch g goes to rank g // MICRO_PER_RANK, which folds it as STREAM_ORDER[g % 4].
# Each rank folds image, text, image, text: two of each stream per step, and the same stream
# (text) on the synced last micro-batch on every rank.
STREAM_ORDER = ("image", "text", "image", "text")
PLAIN_BATCH = 4
# Micro-batch sizes (= loss tokens) of the token variant, the same table every step. The ranks'
# local image:text token ratios (7:6 and 10:3) differ from the global one (17:9), so a rank that
# weighted the streams by its local token counts would take a different step.
TOKENS = (3, 5, 4, 1, 8, 2, 2, 1)
REFUSAL_WITHIN_S = 10.0  # a refused step() must raise quickly on every rank (no hang)


# ----------------------------------------------------------------------------- the setup


def _model() -> nn.Module:
    """Square 8x8 weights, so that every Kronecker factor is well conditioned from the start.

    A wider hidden layer (8 -> 16 -> 8) makes factors that are almost rank deficient: tanh is
    nearly linear, so the 16 hidden activations span about 8 directions. Their tiny eigenvalue
    gaps (1e-10 against 1e-3) let fp32 rounding turn SOAP's first eigenbasis around, and the
    reordered single-process runs then differ by 1e-2..1e-1 of the displacement. A rounding
    floor that large would hide real errors.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8, bias=False),
    )


def _optimizer(params, noise_shrinkage: bool = False) -> mlfop.MLFOPSOAP:
    # precondition_frequency=2: the eigenbases are refreshed within the 5 steps. The noise
    # shrinkage is tested on and off: on, each rank records its synced micro-batch's norm before
    # DDP's average (mlfop.distributed.LocalMicroNorms), so the estimate is a single process's.
    return mlfop.MLFOPSOAP(params, streams=("image", "text"), lr=1e-2, precondition_frequency=2,
                           noise_shrinkage=noise_shrinkage)


def _stream(g: int) -> str:
    return STREAM_ORDER[g % MICRO_PER_RANK]


def _micro_batches(step: int, tokens: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's MICRO_GLOBAL micro-batches, identical on every rank and in the parent."""
    gen = torch.Generator().manual_seed(1000 + step)
    batches = []
    for g in range(MICRO_GLOBAL):
        n = TOKENS[g] if tokens else PLAIN_BATCH
        x = torch.randn(n, 8, generator=gen)
        shift = 1.0 if _stream(g) == "image" else -1.0  # the two streams pull apart
        y = shift * x.flip(1) + 0.1 * torch.randn(n, 8, generator=gen)
        batches.append((x, y))
    return batches


def _loss(model, x, y, tokens: bool, per_process: int, data_parallel: int, total_tokens: int):
    """Loss of one micro-batch, so that a step's gradient is that of the global mean loss.

    Plain: the micro-batch mean divided by the micro-batches per process (DDP's average over
    the ranks completes the global mean). Tokens: the per-token sum divided by the global token
    count, times the data-parallel size that DDP's average divides out (x2 is exact in floating
    point).
    """
    err = (model(x) - y).pow(2).mean(dim=1)
    if tokens:
        return err.sum() * (data_parallel / total_tokens)
    return err.mean() / per_process


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _relative(a, b, start) -> float:
    """||a - b|| relative to b's displacement from ``start``.

    Not relative to ||b||: the initial weights dominate that norm and would hide a wrong step.
    """
    return float((_flat(a) - _flat(b)).norm() / (_flat(b) - _flat(start)).norm())


def _single_process(tokens: bool, order: list[int], noise_shrinkage: bool = False) -> list[torch.Tensor]:
    """The reference: all MICRO_GLOBAL micro-batches in one process, folded in ``order``."""
    model = _model()
    opt = _optimizer(model.parameters(), noise_shrinkage)
    for step in range(STEPS):
        batches = _micro_batches(step, tokens)
        total = sum(x.shape[0] for x, _ in batches)
        for g in order:
            x, y = batches[g]
            _loss(model, x, y, tokens, MICRO_GLOBAL, 1, total).backward()
            opt.fold(_stream(g), tokens=x.shape[0] if tokens else None)
        opt.step()
        opt.zero_grad()
    return _params(model)


# ------------------------------------------------------------------------------ the ranks


def _own(rank: int) -> list[int]:
    return list(range(rank * MICRO_PER_RANK, (rank + 1) * MICRO_PER_RANK))


def _accumulate(ddp, opt, batches, indices, streams, tokens=False, sync_last=True) -> None:
    """One rank's share of a step: micro-batches ``indices``, folded as ``streams``."""
    total = sum(x.shape[0] for x, _ in batches)
    for j, (g, stream) in enumerate(zip(indices, streams)):
        x, y = batches[g]
        sync = sync_last and j == len(indices) - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            _loss(ddp, x, y, tokens, MICRO_PER_RANK, WORLD, total).backward()
        opt.fold(stream, tokens=x.shape[0] if tokens else None)


def _good_step(ddp, opt, rank: int, step: int, tokens: bool = False) -> None:
    _accumulate(ddp, opt, _micro_batches(step, tokens), _own(rank), STREAM_ORDER, tokens)
    opt.step()
    opt.zero_grad()


def _setup(noise_shrinkage: bool = False):
    model = _model()
    ddp = DDP(model)
    return model, ddp, _optimizer(model.parameters(), noise_shrinkage)


def _train(rank: int, tokens: bool, noise_shrinkage: bool = False) -> dict:
    model, ddp, opt = _setup(noise_shrinkage)
    for step in range(STEPS):
        _good_step(ddp, opt, rank, step, tokens)
    return {"params": _params(model), "steps": [float(opt.state[p]["step"]) for p in model.parameters()]}


def _snapshot(model, opt) -> list[torch.Tensor]:
    """Parameters and every optimizer state tensor, to check that a refused step changed nothing."""
    out = _params(model)
    for p in model.parameters():
        out += [value.clone() for _, value in sorted(opt.state[p].items())]
    return out


def _refused(rank: int, streams, sync_last: bool, warm_steps: int = 2) -> dict:
    """``warm_steps`` good steps, then an accumulation that step() must refuse on every rank.

    Then zero_grad() and one good step: the ranks must still be in lockstep (after a refusal on
    one rank only, the other would wait in a collective and the good step would hang).
    """
    model, ddp, opt = _setup()
    for step in range(warm_steps):
        _good_step(ddp, opt, rank, step)
    _accumulate(ddp, opt, _micro_batches(warm_steps, False), _own(rank), streams[rank], sync_last=sync_last)
    outcome = attempt_step(opt, lambda: _snapshot(model, opt))  # (folding changed no parameter or state)
    opt.zero_grad()
    _good_step(ddp, opt, rank, warm_steps + 1)
    return {**outcome, "after": _params(model)}


def _last_stream_differs(rank: int) -> dict:
    """Rank 1 folds its micro-batches as text, image, text, image (the same streams, reordered).

    Both ranks fold 2 image and 2 text micro-batches, but DDP's average lands in the last fold
    (image on rank 1, text on rank 0). Stops at the first refused step.
    """
    model, ddp, opt = _setup()
    own = _own(rank)
    indices = own if rank == 0 else [own[1], own[0], own[3], own[2]]
    for step in range(STEPS):
        _accumulate(ddp, opt, _micro_batches(step, False), indices, [_stream(g) for g in indices])
        try:
            opt.step()
        except ValueError as exc:
            return {"error": str(exc), "params": _params(model)}
        opt.zero_grad()
    return {"error": None, "params": _params(model)}


def _dcp_resume(rank: int) -> dict:
    """Save with DCP after 2 steps (balanced weights, noise estimate on), resume a fresh model
    and optimizer from it: the run continues bit for bit as the uninterrupted one."""

    def make():
        model = _model()
        ddp = DDP(model)
        opt = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text"), lr=1e-2, precondition_frequency=2,
                              stream_weights="balanced")
        return model, opt, lambda t: _good_step(ddp, opt, rank, t)

    (model, _), (fresh, resumed) = dcp_resume(rank, make, 2, STEPS)
    return {"uninterrupted": _params(model), "resumed": _params(fresh), "ema": resumed.stream_norm_ema}


SCENARIOS = {
    "plain": lambda rank: _train(rank, tokens=False),
    "tokens": lambda rank: _train(rank, tokens=True),
    "plain_noise": lambda rank: _train(rank, tokens=False, noise_shrinkage=True),
    "tokens_noise": lambda rank: _train(rank, tokens=True, noise_shrinkage=True),
    # The same number of micro-batches, different per-stream counts (2:2 against 3:1).
    "counts": lambda rank: _refused(rank, [("image", "image", "text", "text"), ("image",) * 3 + ("text",)], True),
    # The text stream folded on rank 1 only.
    "one_rank": lambda rank: _refused(rank, [("image",) * 4, STREAM_ORDER], True),
    # Every micro-batch inside no_sync(): p.grad stays rank-local.
    "no_sync": lambda rank: _refused(rank, [STREAM_ORDER, STREAM_ORDER], False),
    # The same with a single stream (that step is plain SOAP on p.grad).
    "no_sync_one_stream": lambda rank: _refused(rank, [("image",) * 4, ("image",) * 4], False),
    "last_stream_differs": _last_stream_differs,
    "dcp_resume": _dcp_resume,
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario's results, per rank (one spawn for the whole module)."""
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("ddp"))


# ------------------------------------------------------------------------------- the tests

# Orders of the reference's folds. Each stream's sum is the same set of micro-batch gradients
# added up in a different order, so the spread of these runs is the rounding floor.
_RANK_MAJOR = list(range(MICRO_GLOBAL))  # rank 0's micro-batches first, as the DDP split
_INTERLEAVED = [g for j in range(MICRO_PER_RANK) for g in range(j, MICRO_GLOBAL, MICRO_PER_RANK)]
_REVERSED = _RANK_MAJOR[::-1]

# How far the DDP run may be from the single process, in units of the measured floor.
# Measured (fp32, this model): floor 9.5e-6 (plain) and 1.4e-5 (tokens) of the displacement,
# DDP-vs-single 6.8e-6 and 4.6e-6, that is 0.3-0.7 floors. In float64 the same floor is 1e-14:
# it is rounding (about 1e2 x eps), amplified by SOAP's eigenbases. The DDP run adds up each
# stream in yet another order (per rank, then across ranks, plus DDP's own average of p.grad),
# so it can land a few floors out, though not 10. A real error is 4-5 orders of magnitude
# larger: weighting the streams by one rank's token counts moved the parameters by 0.24-0.32 of
# the displacement, and a stream fed DDP's average on one rank only by 0.47.
_FLOORS = 10.0


@pytest.mark.parametrize("variant", ["plain", "tokens", "plain_noise", "tokens_noise"])
def test_ddp_matches_single_process(ranks, variant):
    rank0, rank1 = scenario_results(ranks, variant)
    # Every rank holds the same averaged streams and takes the same deterministic step.
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b), f"{variant}: the ranks' parameters differ"
    start = _params(_model())
    assert rank0["steps"] == [float(STEPS - 1)] * len(start)  # the first call sets up the bases

    tokens, noise = variant.startswith("tokens"), variant.endswith("noise")
    references = [_single_process(tokens, order, noise) for order in (_RANK_MAJOR, _INTERLEAVED, _REVERSED)]
    floor = max(_relative(references[i], references[j], start) for i in range(3) for j in range(i + 1, 3))
    distance = _relative(rank0["params"], references[0], start)
    print(f"{variant}: rounding floor {floor:.2e}, ddp-vs-single {distance:.2e} (of the displacement)")
    assert distance <= max(_FLOORS * floor, 1e-6), f"{variant}: floor {floor:.2e}, ddp-vs-single {distance:.2e}"
    if noise:  # the shrinkage acts here: without it the run is far away
        assert _relative(_single_process(tokens, _RANK_MAJOR, False), references[0], start) > 100 * max(floor, distance)


@pytest.mark.parametrize(
    ("scenario", "match"),
    [
        ("counts", "ranks folded different streams"),
        ("one_rank", "ranks folded different streams"),
        ("no_sync", "p.grad no longer matches"),
        ("no_sync_one_stream", "p.grad no longer matches"),
    ],
)
def test_ddp_refuses_on_every_rank(ranks, scenario, match):
    outcomes = scenario_results(ranks, scenario)
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] is not None, f"rank {rank} took the step"
        assert match in outcome["error"], f"rank {rank}: {outcome['error']}"
        assert outcome["elapsed"] < REFUSAL_WITHIN_S, f"rank {rank} needed {outcome['elapsed']:.1f} s to refuse"
        assert outcome["unchanged"], f"rank {rank} changed parameters or optimizer state"
    if match.startswith("ranks"):  # (the p.grad message quotes the rank's own residual)
        assert outcomes[0]["error"] == outcomes[1]["error"], "the ranks raised different errors"
    # The good step after the refusal kept the ranks in lockstep.
    for a, b in zip(outcomes[0]["after"], outcomes[1]["after"]):
        assert torch.equal(a, b), "the ranks diverged after the refused step"


def test_ddp_last_fold_in_different_streams_is_refused(ranks):
    """DDP averages the synced (last) micro-batch, so the ranks must end on the same stream."""
    outcomes = scenario_results(ranks, "last_stream_differs")
    for outcome in outcomes:
        assert outcome["error"] is not None and "ranks folded different streams" in outcome["error"]
    assert outcomes[0]["error"] == outcomes[1]["error"]


def test_ddp_dcp_resume_is_bitwise(ranks):
    for outcome in scenario_results(ranks, "dcp_resume"):
        assert set(outcome["ema"]) == {"image", "text"}
        for a, b in zip(outcome["uninterrupted"], outcome["resumed"]):
            assert torch.equal(a, b)

