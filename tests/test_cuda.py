"""The optimizers on a CUDA device. Skipped without a GPU (there is none on the CI machine);
run it wherever one is at hand: ``python -m pytest tests/test_cuda.py``.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising op warn, so the number of
host synchronisations of a regular step is counted by the device itself.
"""

import copy
import warnings

import pytest
import torch

import mlfop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16)).to(device, dtype)


def _train(model, opt, steps, fold):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for stream in ("image", "text", "image", "text"):
            x = torch.randn(8, 16, generator=gen).to(next(model.parameters()))
            (model(x) - x.flip(1)).float().pow(2).mean().backward()
            if fold:
                opt.fold(stream, tokens=8)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["soap", "fop"])
def test_cuda_step_equals_cpu_and_keeps_state_on_the_device(kind):
    make = (lambda p: mlfop.SOAP(p, lr=1e-2)) if kind == "soap" else (lambda p: mlfop.MLFOPSOAP(p, lr=1e-2))
    cpu, gpu = _model(device="cpu"), _model()
    opt_cpu, opt_gpu = make(cpu.parameters()), make(gpu.parameters())
    _train(cpu, opt_cpu, 12, kind == "fop")
    _train(gpu, opt_gpu, 12, kind == "fop")
    start = torch.cat([p.flatten() for p in _model(device="cpu").parameters()])
    a = torch.cat([p.detach().flatten() for p in cpu.parameters()])
    b = torch.cat([p.detach().flatten().cpu() for p in gpu.parameters()])
    assert float((a - b).norm() / (a - start).norm()) < 1e-3
    for state in opt_gpu.state.values():
        assert all(v.is_cuda for k, v in state.items() if k != "step")


@pytest.mark.parametrize("kind", ["soap", "fop"])
def test_a_regular_cuda_step_synchronises_a_constant_number_of_times(kind):
    counts = []
    for width in (1, 4):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(width)]).cuda()
        opt = mlfop.SOAP(model.parameters()) if kind == "soap" else mlfop.MLFOPSOAP(model.parameters())
        _train(model, opt, 3, kind == "fop")
        for stream in ("image", "text"):
            model(torch.randn(8, 16, device="cuda")).pow(2).mean().backward()
            if kind == "fop":
                opt.fold(stream, tokens=8)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1] <= (1 if kind == "soap" else 2), counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_with_two_streams_train_on_cuda(dtype):
    model = _model(dtype)
    opt = mlfop.MLFOPSOAP(model.parameters(), lr=1e-2)
    before = copy.deepcopy(model)
    _train(model, opt, 12, True)
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert all(v.dtype in (torch.float32,) for s in opt.state.values() for k, v in s.items() if k != "step")


def test_compiled_step_on_cuda_equals_eager():
    eager_model, compiled_model = _model(), _model()
    eager, compiled = mlfop.MLFOPSOAP(eager_model.parameters(), lr=1e-2), mlfop.MLFOPSOAP(compiled_model.parameters(), lr=1e-2)
    compiled.step = torch.compile(compiled.step)
    _train(eager_model, eager, 8, True)
    _train(compiled_model, compiled, 8, True)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
