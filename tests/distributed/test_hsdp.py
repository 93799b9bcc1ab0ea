"""HSDP (a 2 x 2 ``(replicate, shard)`` mesh of 4 gloo ranks) and a DCP checkpoint of a 4-rank
FSDP2 run resumed under HSDP, where every parameter has another owner.

Under HSDP the two replica groups do the same owner-rank step on the same averaged gradients,
so all four ranks hold the same parameters; the reference is one process on the joint
micro-batches of the four ranks (see test_fsdp).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from rank_spawn import run_ranks, scenario_results
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
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = [tempfile.mkdtemp(prefix="mlfop-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    folder = folder[0]
    model = _sharded_model(_mesh((WORLD,)))
    opt = _optimizer("mlfop", model, stream_weights="balanced")
    _run(model, opt, rank, range(2))
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    dist.barrier()
    _run(model, opt, rank, range(2, STEPS))
    uninterrupted = _full_params(model)

    fresh = _sharded_model(_mesh((2, 2)))
    resumed = _optimizer("mlfop", fresh, stream_weights="balanced")
    model_state, optim_state = get_state_dict(fresh, resumed)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=folder)
    set_state_dict(fresh, resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    steps = [float(resumed.state[p]["step"]) for p in fresh.parameters() if resumed.state[p]]
    _run(fresh, resumed, rank, range(2, STEPS))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder)
    return {"uninterrupted": uninterrupted, "resumed": _full_params(fresh), "steps": steps}


SCENARIOS = {"hsdp": _hsdp, "reshard": _reshard}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("hsdp"), world=WORLD)


def test_hsdp_matches_single_process(ranks):
    outcomes = scenario_results(ranks, "hsdp")
    assert all(p == ("R", "S(0)") for p in outcomes[0]["placements"])  # (replicate, shard)
    for outcome in outcomes[1:]:
        for a, b in zip(outcomes[0]["params"], outcome["params"]):
            assert torch.equal(a, b), "the ranks' parameters differ"
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
