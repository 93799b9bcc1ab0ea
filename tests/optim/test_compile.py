"""``torch.compile(opt.step)`` with inductor gives the eager result, without a recompile per step.

The step's few host reads (the finite check, the rescale flag) are graph breaks; everything
between them compiles. The graphs of a refresh step and of a regular step are both kept, so
the number of graphs stops growing after the first few calls.
"""

import pytest
import torch
import torch._dynamo

import mlfop

STEPS = 12  # refreshes at t = 3, 6, 9, 12 (f = 3)


def _run(make, folds, compiled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = make(model.parameters())
    step = torch.compile(opt.step) if compiled else opt.step
    gen = torch.Generator().manual_seed(1)
    graphs = []
    for _ in range(STEPS):
        for stream in folds or (None,):
            x = torch.randn(16, 8, generator=gen)
            (model(x) - x.flip(1)).pow(2).mean().backward()
            if stream is not None:
                opt.fold(stream)
        step()
        opt.zero_grad()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return torch.cat([p.detach().flatten() for p in model.parameters()]), start, graphs


@pytest.mark.parametrize(
    "make, folds",
    [
        pytest.param(lambda p: mlfop.SOAP(p, lr=1e-2, precondition_frequency=3), (), id="SOAP"),
        pytest.param(lambda p: mlfop.MLFOPSOAP(p, lr=1e-2, precondition_frequency=3), ("image", "text", "image", "text"),
                     id="MLFOPSOAP-two-streams"),
    ],
)
def test_compiled_step_equals_eager_and_stops_recompiling(make, folds):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, start, _ = _run(make, folds, compiled=False)
    compiled, _, graphs = _run(make, folds, compiled=True)
    assert float((compiled - eager).norm() / (eager - start).norm()) < 1e-5
    # A value seen to change is recompiled once as dynamic (dynamo's automatic dynamic shapes),
    # for the regular and the refresh branch: after the second refresh (call 7) every call,
    # the refresh at call 10 included, reuses compiled graphs (measured: no new graph after 8).
    assert graphs[7] == graphs[-1], graphs
