"""HSDP (a 2 x 2 ``(replicate, shard)`` mesh of 4 gloo ranks) and a DCP checkpoint of a 4-rank
FSDP2 run resumed under HSDP, where every parameter has another owner.

Under HSDP the two replica groups do the same owner-rank step on the same averaged gradients,
so all four ranks hold the same parameters; the reference is one process on the joint
micro-batches of the four ranks (see test_fsdp).
"""

from __future__ import annotations

import pytest
import torch
from rank_spawn import assert_same_on_every_rank, dcp_resume, run_ranks, scenario_results
from test_ddp_folding import _model, _params, _relative
from test_fsdp import STEPS, _accumulate, _full_params, _optimizer, _sharded_model, _single_process

WORLD = 4
_FLOORS = 10.0


def _mesh(shape: tuple[int, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _run(model, opt, rank: int, steps) -> None:
    for step in steps:
        _accumulate(model, opt, rank, step, False, world=WORLD)
        opt.step()
        opt.zero_grad()


def _hsdp(rank: int) -> dict:
    model = _sharded_model(_mesh((2, 2)))
    opt = _optimizer("mlfop", model)
    _run(model, opt, rank, range(STEPS))
    placements = [tuple(map(str, p.placements)) for p in model.parameters()]
    return {"params": _full_params(model), "placements": placements,
            "owned": sum(1 for p in model.parameters() if opt.state[p])}


def _reshard(rank: int) -> dict:
    """FSDP2 over 4 ranks for 2 steps, saved with DCP; then resumed under HSDP (2 x 2)."""

    def make(shape: tuple[int, ...]):
        model = _sharded_model(_mesh(shape))
        opt = _optimizer("mlfop", model, stream_weights="balanced")
        return model, opt, lambda t: _run(model, opt, rank, [t])

    loaded_steps = []
    (model, _), (fresh, _) = dcp_resume(
        rank, lambda: make((WORLD,)), 2, STEPS, make_resumed=lambda: make((2, 2)),
        on_load=lambda opt: loaded_steps.extend(float(entry["step"]) for entry in opt.state.values() if entry))
    return {"uninterrupted": _full_params(model), "resumed": _full_params(fresh), "steps": loaded_steps}


SCENARIOS = {"hsdp": _hsdp, "reshard": _reshard}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("hsdp"), world=WORLD)


def test_hsdp_matches_single_process(ranks):
    outcomes = scenario_results(ranks, "hsdp")
    assert all(p == ("R", "S(0)") for p in outcomes[0]["placements"])  # (replicate, shard)
    assert_same_on_every_rank(outcomes)
    # Each replica group divides the parameters between its two ranks.
    count = len(outcomes[0]["params"])
    assert outcomes[0]["owned"] + outcomes[1]["owned"] == count == outcomes[2]["owned"] + outcomes[3]["owned"]
    start = _params(_model())
    reference = _single_process("mlfop", False, world=WORLD)
    floor = _relative(_single_process("mlfop", False, reverse_rows=True, world=WORLD), reference, start)
    distance = _relative(outcomes[0]["params"], reference, start)
    print(f"hsdp: rounding floor {floor:.2e}, hsdp-vs-single {distance:.2e} (of the displacement)")
    assert distance <= max(_FLOORS * floor, 1e-6)


def test_dcp_checkpoint_of_fsdp2_resumes_under_hsdp_with_other_owners(ranks):
    outcomes = scenario_results(ranks, "reshard")
    start = _params(_model())
    for outcome in outcomes:
        assert outcome["steps"] and all(step == 1.0 for step in outcome["steps"])  # the saved counters
    uninterrupted, resumed = outcomes[0]["uninterrupted"], outcomes[0]["resumed"]
    reference = _single_process("mlfop", False, world=WORLD, stream_weights="balanced")
    floor = _relative(_single_process("mlfop", False, reverse_rows=True, world=WORLD, stream_weights="balanced"),
                      reference, start)
    distance = _relative(resumed, uninterrupted, start)
    print(f"fsdp2(4) -> hsdp(2x2) resume: floor {floor:.2e}, resumed-vs-uninterrupted {distance:.2e}")
    assert distance <= max(_FLOORS * floor, 1e-6)
