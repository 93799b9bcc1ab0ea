"""``stream_communication_dtype=torch.bfloat16`` (2 gloo ranks): the stream sums cross the ranks
in bf16, half the bytes, under DDP (their all-reduce) and FSDP2 (their gather to the owners).

Measured against the same run with float32 communication: the distance is bf16 rounding of the
streams (far above the float32 floor, far below what a wrong reduction gives), and the bytes
counted in the collectives are halved for the stream sums.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from rank_spawn import run_ranks, scenario_results
from test_ddp_folding import STREAM_ORDER, _model, _params, _relative
from test_fsdp import _accumulate, _full_params, _sharded_model
from torch.nn.parallel import DistributedDataParallel as DDP

import mlfop

WORLD, MICRO, STEPS = 2, 4, 5


def _options(dtype):
    return {"lr": 1e-2, "precondition_frequency": 2, "stream_communication_dtype": dtype}


@contextlib.contextmanager
def _counting(counted: dict):
    """Count the bytes handed to all_reduce and all_to_all_single (what leaves a rank)."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_to_all_single")}

    def all_reduce(tensor, *args, **kw):
        counted["all_reduce"] = counted.get("all_reduce", 0) + tensor.nbytes
        return originals["all_reduce"](tensor, *args, **kw)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        me = dist.get_rank(group)
        sent = sum(n for r, n in enumerate(input_split_sizes) if r != me) * input.element_size()
        counted["all_to_all"] = counted.get("all_to_all", 0) + sent
        return originals["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group, **kw)

    dist.all_reduce, dist.all_to_all_single = all_reduce, all_to_all_single
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def _ddp(rank: int, dtype) -> dict:
    model = _model()
    ddp = DDP(model)
    opt = mlfop.MLFOPSOAP(model.parameters(), **_options(dtype))
    counted: dict = {}
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 * step + rank)
        for j in range(MICRO):
            x = torch.randn(4, 8, generator=gen)
            y = (1.0 if STREAM_ORDER[j] == "image" else -1.0) * x.flip(1) + 0.1 * torch.randn(4, 8, generator=gen)
            with contextlib.nullcontext() if j == MICRO - 1 else ddp.no_sync():
                (ddp(x) - y).pow(2).mean().div(MICRO).backward()
            opt.fold(STREAM_ORDER[j])
        with _counting(counted) if step == STEPS - 1 else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
    return {"params": _params(model), "bytes": counted}


def _fsdp(rank: int, dtype) -> dict:
    model = _sharded_model()
    opt = mlfop.MLFOPSOAP(list(model.parameters()), **_options(dtype))
    counted: dict = {}
    for step in range(STEPS):
        _accumulate(model, opt, rank, step, False)
        with _counting(counted) if step == STEPS - 1 else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
    return {"params": _full_params(model), "bytes": counted}


SCENARIOS = {
    "ddp_float32": lambda rank: _ddp(rank, None),
    "ddp_bfloat16": lambda rank: _ddp(rank, torch.bfloat16),
    "fsdp2_float32": lambda rank: _fsdp(rank, None),
    "fsdp2_bfloat16": lambda rank: _fsdp(rank, torch.bfloat16),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("communication"))


@pytest.mark.parametrize(("mode", "collective"), [("ddp", "all_reduce"), ("fsdp2", "all_to_all")])
def test_bf16_stream_communication_halves_the_streams_bytes_at_bf16_rounding(ranks, mode, collective):
    wide, narrow = scenario_results(ranks, f"{mode}_float32"), scenario_results(ranks, f"{mode}_bfloat16")
    for a, b in zip(narrow[0]["params"], narrow[1]["params"]):
        assert torch.equal(a, b)
    start = _params(_model())
    distance = _relative(narrow[0]["params"], wide[0]["params"], start)
    parameters = sum(p.numel() for p in start)
    saved = [w["bytes"][collective] - n["bytes"][collective] for w, n in zip(wide, narrow)]
    print(f"{mode}: bf16 stream communication moves the parameters by {distance:.2e} of the displacement; "
          f"{collective} bytes per rank float32 {[w['bytes'][collective] for w in wide]}, "
          f"bf16 {[n['bytes'][collective] for n in narrow]}")
    assert 1e-6 < distance < 5e-2
    if mode == "ddp":  # K = 2 stream sums of every parameter, 2 bytes saved per element
        assert saved == [2 * 2 * parameters] * WORLD
    else:  # each rank's rows of the parameters owned elsewhere, K = 2 of them
        assert sum(saved) == 2 * 2 * parameters * (WORLD - 1) // WORLD
