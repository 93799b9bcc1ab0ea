"""``SOAP`` and ``MLFOPSOAP`` on FSDP2 (``fully_shard``, 2 gloo ranks): owner-rank preconditioning.

Each rank runs ``MICRO_PER_RANK`` micro-batches per step with FSDP2's default gradient sync
after every micro-batch (a reduce-scatter that averages the ranks' micro-gradients), and folds
each one. The reference is one process that folds the ranks' joint micro-batches (rank 0's
j-th micro-batch and rank 1's together) on the same global batch: FSDP2's fold sees exactly
that joint micro-gradient, so even the noise estimate is the same.
"""

from __future__ import annotations


import pytest
import torch
from rank_spawn import assert_same_on_every_rank, attempt_step, dcp_resume, run_ranks, scenario_results
from test_ddp_folding import _model, _params, _relative

import mlfop

WORLD = 2
MICRO_PER_RANK = 4
STEPS = 5
STREAM_ORDER = ("image", "text", "image", "text")
BATCH = 4
# Per rank and micro-batch, the rows (= loss tokens) of the token variant: the ranks' shares differ.
TOKENS = ((3, 5, 4, 1), (8, 2, 2, 1))
# Head layouts of the test (the model has no attention): the first weight by rows, the last by columns.
HEADS = {0: (2, 0), 4: (4, 1)}
REFUSAL_WITHIN_S = 10.0
CLIP = 0.05  # below the gradients' norm on every step of the run, so clip_grad_norm_ rescales
# Measured on this model: the single process against itself with the joint micro-batches' rows
# reordered (the rounding floor) and FSDP2 against the single process; see the tests' prints.
_FLOORS = 10.0


def _optimizer(kind: str, model: torch.nn.Module, **options):
    params = list(model.parameters())
    if kind == "soap":
        return mlfop.SOAP(params, lr=1e-2, precondition_frequency=2)
    heads = {params[i]: layout for i, layout in HEADS.items()}
    return mlfop.MLFOPSOAP(params, streams=("image", "text"), lr=1e-2, precondition_frequency=2, heads=heads,
                           **options)


def _micro_batches(step: int, tokens: bool, world: int = WORLD):
    """Per rank, its micro-batches ``(x, y)``; the same on every rank and in the parent."""
    gen = torch.Generator().manual_seed(3000 + step)
    out = []
    for rank in range(world):
        batches = []
        for j in range(MICRO_PER_RANK):
            n = TOKENS[rank][j] if tokens else BATCH
            x = torch.randn(n, 8, generator=gen)
            shift = 1.0 if STREAM_ORDER[j] == "image" else -1.0
            batches.append((x, shift * x.flip(1) + 0.1 * torch.randn(n, 8, generator=gen)))
        out.append(batches)
    return out


def _loss(model, x, y, tokens: bool, total_tokens: int, data_parallel: int):
    """The global mean loss's share: FSDP2 averages the ranks' gradients (x ``data_parallel``)."""
    err = (model(x) - y).pow(2).mean(dim=1)
    if tokens:
        return err.sum() * (data_parallel / total_tokens)
    return err.mean() / MICRO_PER_RANK


def _single_process(kind: str, tokens: bool, reverse_rows: bool = False, world: int = WORLD,
                    dtype: torch.dtype = torch.float32, split: bool = False, clip: float | None = None,
                    **options) -> list[torch.Tensor]:
    """The reference: the ranks' joint micro-batches in one process (the rows of a joint
    micro-batch in reverse rank order with ``reverse_rows``, for the rounding floor; one
    backward per rank's part with ``split``, which rounds a low-precision gradient as often
    as FSDP2's average does, though not in the same places)."""
    model = _model().to(dtype)
    opt = _optimizer(kind, model, **options)
    for step in range(STEPS):
        ranks = _micro_batches(step, tokens, world)
        total = sum(x.shape[0] for batches in ranks for x, _ in batches)
        for j in range(MICRO_PER_RANK):
            parts = [ranks[r][j] for r in (reversed(range(world)) if reverse_rows else range(world))]
            rows = sum(x.shape[0] for x, _ in parts)
            if split:
                for x, y in parts:
                    _loss(model, x.to(dtype), y.to(dtype), tokens, total, world).div(world).backward()
            else:
                x, y = torch.cat([p[0] for p in parts]).to(dtype), torch.cat([p[1] for p in parts]).to(dtype)
                # (plain: the mean of the ranks' equal-sized micro-batch means)
                _loss(model, x, y, tokens, total, 1).backward()
            if kind != "soap":
                opt.fold(STREAM_ORDER[j], tokens=rows if tokens else None)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return _params(model)


# ------------------------------------------------------------------------------ the ranks


def _sharded_model(mesh=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model under ``fully_shard`` (HSDP with a 2-D ``mesh``)."""
    from torch.distributed.fsdp import fully_shard

    model = _model().to(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _accumulate(model, opt, rank: int, step: int, tokens: bool, streams=STREAM_ORDER, world: int = WORLD,
                dtype: torch.dtype = torch.float32) -> None:
    ranks = _micro_batches(step, tokens, world)
    total = sum(x.shape[0] for batches in ranks for x, _ in batches)
    for j, (x, y) in enumerate(ranks[rank]):
        _loss(model, x.to(dtype), y.to(dtype), tokens, total, world).backward()
        if isinstance(opt, mlfop.MLFOPSOAP):
            opt.fold(streams[j], tokens=x.shape[0] if tokens else None)


def _train(rank: int, kind: str, tokens: bool = False, dtype: torch.dtype = torch.float32,
           clip: float | None = None, **options) -> dict:
    model = _sharded_model(dtype=dtype)
    opt = _optimizer(kind, model, **options)
    for step in range(STEPS):
        _accumulate(model, opt, rank, step, tokens, dtype=dtype)
        if clip is not None:  # (on DTensor gradients: the global norm)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    owned = sum(1 for p in model.parameters() if opt.state[p])
    return {"params": _full_params(model), "owned": owned}


def _counted_step(rank: int, kind: str) -> dict:
    """Bytes this rank sends to the others in the optimizer's collectives during one step (the
    second, a regular one), counted by wrapping them; and what the docs' formula predicts."""
    import torch.distributed as dist

    model = _sharded_model()
    opt = _optimizer(kind, model)
    _accumulate(model, opt, rank, 0, False)
    opt.step()
    opt.zero_grad()
    _accumulate(model, opt, rank, 1, False)
    counted = {"all_to_all": 0, "small": 0}
    originals = {name: getattr(dist, name) for name in ("all_to_all_single", "all_reduce", "all_gather")}

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        me = dist.get_rank(group)
        counted["all_to_all"] += sum(n for r, n in enumerate(input_split_sizes) if r != me) * input.element_size()
        return originals["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group, **kw)

    def small(name):
        def wrapped(tensor_or_list, tensor=None, *args, **kw):
            counted["small"] += (tensor if name == "all_gather" else tensor_or_list).nbytes
            return originals[name](tensor_or_list, *(() if tensor is None else (tensor,)), *args, **kw)
        return wrapped

    try:
        dist.all_to_all_single = all_to_all_single
        dist.all_reduce, dist.all_gather = small("all_reduce"), small("all_gather")
        opt.step()
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    sharding, k = opt._sharding, 2 if kind == "mlfop" else 0
    predicted = 0
    for p in model.parameters():  # 4-byte elements: (2 + K) local rows out, the others' rows back
        local, whole = p.to_local().numel(), p.numel()
        predicted += 4 * ((2 + k) * local if sharding.owners[p] != sharding.rank else whole - local)
    return {**counted, "predicted": predicted, "parameters": sum(p.numel() for p in model.parameters())}


def _snapshot(model, opt) -> list[torch.Tensor]:
    out = _full_params(model)
    for p in model.parameters():
        out += [value.clone() for _, value in sorted(opt.state[p].items())]
    return out


def _refused(rank: int, streams) -> dict:
    """Two good steps, then folds in another order on rank 1: step() must refuse on every rank."""
    model = _sharded_model()
    opt = _optimizer("mlfop", model)
    for step in range(2):
        _accumulate(model, opt, rank, step, False)
        opt.step()
        opt.zero_grad()
    _accumulate(model, opt, rank, 2, False, streams[rank])
    outcome = attempt_step(opt, lambda: _snapshot(model, opt))
    opt.zero_grad()
    _accumulate(model, opt, rank, 3, False)
    opt.step()
    return {**outcome, "after": _full_params(model)}


def _no_sync(rank: int) -> dict:
    """Gradient sync on the last micro-batch only: the first fold must say what to do."""
    model = _sharded_model()
    opt = _optimizer("mlfop", model)
    x, y = _micro_batches(0, False)[rank][0]
    model.set_requires_gradient_sync(False)
    _loss(model, x, y, False, 1, WORLD).backward()
    try:
        opt.fold("image")
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _nonfinite(rank: int) -> dict:
    """A NaN in rank 1's data: the step is skipped on every rank, parameters and state unchanged."""
    model = _sharded_model()
    opt = _optimizer("mlfop", model)
    _accumulate(model, opt, rank, 0, False)
    opt.step()
    opt.zero_grad()
    before = _snapshot(model, opt)
    ranks = _micro_batches(1, False)
    for j, (x, y) in enumerate(ranks[rank]):
        if rank == 1 and j == 2:
            x = x.clone()
            x[0, 0] = float("nan")
        _loss(model, x, y, False, 1, WORLD).backward()
        opt.fold(STREAM_ORDER[j])
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))
    opt.zero_grad()
    _accumulate(model, opt, rank, 2, False)
    opt.step()
    return {"unchanged": unchanged, "skipped": opt.skipped_steps, "after": _full_params(model)}


def _dcp_resume(rank: int) -> dict:
    """Save mid-run with DCP, load into a fresh model and optimizer, continue: as uninterrupted."""

    def make():
        model = _sharded_model()
        opt = _optimizer("mlfop", model, stream_weights="balanced")

        def step(t: int) -> None:
            _accumulate(model, opt, rank, t, False)
            opt.step()
            opt.zero_grad()

        return model, opt, step

    (model, _), (fresh, resumed) = dcp_resume(rank, make, 2, STEPS)
    return {"uninterrupted": _full_params(model), "resumed": _full_params(fresh), "ema": resumed.stream_norm_ema}


def _uneven_rows(rank: int) -> dict:
    """Gather and scatter of parameters whose rows do not divide evenly (5 and 1 rows on 2 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mlfop.fully_sharded import OwnerSharding

    mesh = init_device_mesh("cpu", (WORLD,))
    whole = [torch.arange(15.0).view(5, 3), torch.arange(4.0).view(1, 4), torch.arange(6.0)]
    params = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in whole]
    sharding = OwnerSharding(params, lambda p: float(p.numel()), "test")
    full = sharding.gather(params, [[p.to_local(), torch.stack([p.to_local(), -p.to_local()])] for p in params])
    gathered = {i: [t.clone() for t in full[p]] for i, p in enumerate(params) if p in full}
    sharding.scatter(params, {p: tensors[0] * 10 for p, tensors in full.items()})
    return {"gathered": gathered, "owners": [sharding.owners[p] for p in params],
            "scattered": [p.full_tensor() for p in params], "whole": whole}


def _refused_at_construction(rank: int) -> dict:
    """Placements other than row sharding, and DTensor parameters mixed with plain ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    by_columns = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [Shard(1)]))
    by_rows = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0)]))
    errors = {}
    for name, params in (("columns", [by_columns]), ("mixed", [by_rows, torch.nn.Parameter(torch.zeros(3))])):
        try:
            mlfop.MLFOPSOAP(params)
        except ValueError as exc:
            errors[name] = str(exc)
    opt = mlfop.SOAP([by_rows])
    try:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    except ValueError as exc:
        errors["added"] = str(exc)
    errors["still_sharded"] = opt._owner_sharding() is not None
    return errors


def _host_reads(rank: int) -> dict:
    """The host reads of a regular step and of the folds under FSDP2 (the counter of test_host_reads)."""
    import importlib.util
    from pathlib import Path

    from torch.distributed.fsdp import fully_shard

    path = Path(__file__).resolve().parents[1] / "optim" / "test_host_reads.py"
    spec = importlib.util.spec_from_file_location("host_reads_counter", path)
    counter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counter)

    def shard(model):
        for layer in model:
            fully_shard(layer)
        fully_shard(model)

    return {f"{kind}_{layers}": counter._reads_of_a_regular_step(kind, layers, shard=shard)
            for kind in ("soap", "mlfop") for layers in (1, 3)}


SCENARIOS = {
    "soap": lambda rank: _train(rank, "soap"),
    "mlfop": lambda rank: _train(rank, "mlfop"),
    "mlfop_tokens": lambda rank: _train(rank, "mlfop", tokens=True),
    "mlfop_bf16": lambda rank: _train(rank, "mlfop", dtype=torch.bfloat16),
    "mlfop_clipped": lambda rank: _train(rank, "mlfop", clip=CLIP),
    "bytes_soap": lambda rank: _counted_step(rank, "soap"),
    "bytes_mlfop": lambda rank: _counted_step(rank, "mlfop"),
    "uneven_rows": _uneven_rows,
    "order_differs": lambda rank: _refused(rank, [STREAM_ORDER, ("text", "image", "image", "text")]),
    "no_sync": _no_sync,
    "nonfinite": _nonfinite,
    "dcp_resume": _dcp_resume,
    "refusals": _refused_at_construction,
    "host_reads": _host_reads,
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("fsdp"))


# ------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(("scenario", "kind", "tokens", "clip"),
                         [("soap", "soap", False, None), ("mlfop", "mlfop", False, None),
                          ("mlfop_tokens", "mlfop", True, None), ("mlfop_clipped", "mlfop", False, CLIP)])
def test_fsdp2_matches_single_process(ranks, scenario, kind, tokens, clip):
    rank0, rank1 = scenario_results(ranks, scenario)
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b), f"{scenario}: the ranks' parameters differ"
    params = len(rank0["params"])
    assert rank0["owned"] + rank1["owned"] == params and min(rank0["owned"], rank1["owned"]) > 0

    start = _params(_model())
    reference = _single_process(kind, tokens, clip=clip)
    floor = _relative(_single_process(kind, tokens, reverse_rows=True, clip=clip), reference, start)
    distance = _relative(rank0["params"], reference, start)
    print(f"{scenario}: rounding floor {floor:.2e}, fsdp2-vs-single {distance:.2e} (of the displacement)")
    assert distance <= max(_FLOORS * floor, 1e-6), f"{scenario}: floor {floor:.2e}, fsdp2-vs-single {distance:.2e}"
    if kind == "mlfop":  # the comparison can fail: the noise estimate off moves the result
        other = _single_process(kind, tokens, clip=clip, noise_shrinkage=False)
        assert _relative(other, reference, start) > 100 * max(distance, 1e-7)


def test_fsdp2_bf16_parameters_match_single_process(ranks):
    rank0, rank1 = scenario_results(ranks, "mlfop_bf16")
    for a, b in zip(rank0["params"], rank1["params"]):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    start = [p.to(torch.bfloat16) for p in _params(_model())]
    reference = _single_process("mlfop", False, dtype=torch.bfloat16)
    floor = _relative(_single_process("mlfop", False, split=True, dtype=torch.bfloat16), reference, start)
    distance = _relative(rank0["params"], reference, start)
    print(f"mlfop bf16: rounding floor {floor:.2e}, fsdp2-vs-single {distance:.2e} (of the displacement)")
    assert distance <= max(_FLOORS * floor, 1e-6)


@pytest.mark.parametrize(("scenario", "streams"), [("bytes_soap", 0), ("bytes_mlfop", 2)])
def test_fsdp2_step_sends_the_bytes_of_the_formula(ranks, scenario, streams):
    outcomes = scenario_results(ranks, scenario)
    for rank, outcome in enumerate(outcomes):
        print(f"{scenario} rank {rank}: {outcome['all_to_all']} B in all_to_all (formula {outcome['predicted']}), "
              f"{outcome['small']} B in small collectives; {outcome['parameters']} parameters")
        assert outcome["all_to_all"] == outcome["predicted"]
        assert outcome["small"] <= 1024  # flags, scalars and the fold descriptors
    # Over the ranks: (K + 2) rows out per parameter, 1 back, of the (W - 1) / W not held.
    total = sum(o["all_to_all"] for o in outcomes)
    assert total == 4 * (streams + 3) * outcomes[0]["parameters"] * (WORLD - 1) // WORLD


def test_owner_gather_and_scatter_with_uneven_rows(ranks):
    outcomes = scenario_results(ranks, "uneven_rows")
    whole = outcomes[0]["whole"]
    assert outcomes[0]["owners"] == outcomes[1]["owners"]
    seen = set()
    for rank, outcome in enumerate(outcomes):
        for i, (grad, stacked) in outcome["gathered"].items():
            assert outcome["owners"][i] == rank
            assert torch.equal(grad, whole[i]) and torch.equal(stacked, torch.stack([whole[i], -whole[i]]))
            seen.add(i)
        for got, expected in zip(outcome["scattered"], whole):
            assert torch.equal(got, expected * 10)
    assert seen == set(range(len(whole)))


def test_fsdp2_refuses_folds_in_another_order_on_every_rank(ranks):
    outcomes = scenario_results(ranks, "order_differs")
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] is not None and "same stream at the same micro-batch" in outcome["error"], rank
        assert outcome["elapsed"] < REFUSAL_WITHIN_S
        assert outcome["unchanged"], f"rank {rank} changed parameters or state"
    assert outcomes[0]["error"] == outcomes[1]["error"]
    for a, b in zip(outcomes[0]["after"], outcomes[1]["after"]):
        assert torch.equal(a, b)


def test_fsdp2_without_per_micro_batch_sync_is_refused_with_the_fix(ranks):
    for outcome in scenario_results(ranks, "no_sync"):
        assert outcome["error"] is not None
        assert "set_requires_gradient_sync(False)" in outcome["error"] and "leave gradient sync on" in outcome["error"]


def test_fsdp2_nonfinite_step_is_skipped_on_every_rank(ranks):
    outcomes = scenario_results(ranks, "nonfinite")
    for outcome in outcomes:
        assert outcome["unchanged"] and outcome["skipped"] == 1
    for a, b in zip(outcomes[0]["after"], outcomes[1]["after"]):
        assert torch.equal(a, b)


def test_fsdp2_dcp_resume_is_bitwise(ranks):
    for outcome in scenario_results(ranks, "dcp_resume"):
        assert set(outcome["ema"]) == {"image", "text"}
        for a, b in zip(outcome["uninterrupted"], outcome["resumed"]):
            assert torch.equal(a, b)


def test_unsupported_sharding_is_refused_at_construction_with_the_fix(ranks):
    for errors in scenario_results(ranks, "refusals"):
        assert "Shard(0)" in errors["columns"] and "tensor parallelism is not supported" in errors["columns"]
        assert "fully_shard the root module too" in errors["mixed"]
        assert "fully_shard the root module too" in errors["added"]
        assert errors["still_sharded"]  # the refused group left the optimizer as it was


def test_fsdp2_step_reads_as_many_values_as_one_process_whatever_the_size(ranks):
    for reads in scenario_results(ranks, "host_reads"):
        for layers in (1, 3):
            assert reads[f"soap_{layers}"][1] == ["aten._local_scalar_dense.default"]
            folds, step = reads[f"mlfop_{layers}"]
            # whether the gradients are finite; the ranks' fold descriptors; the rescale flag and reach
            assert folds == [] and step == ["aten._local_scalar_dense.default", "tolist", "tolist"]

