"""The gradient routes: UPGrad's aggregation through torchjd and ML-FOP-SOAP's folding."""

import torch

from mlfop.bench.config import RunConfig
from mlfop.bench.optimizers import build_optimizer


class _Model(torch.nn.Module):
    """A stand-in for a TinyModel: one parameter, all trainable."""

    def __init__(self, *shape):
        super().__init__()
        self.param = torch.nn.Parameter(torch.zeros(*shape))

    @property
    def hf(self):
        return self  # no attention module: the head level finds no heads

    def trainable_parameters(self):
        return [self.param]


def _accumulate(route, param, grads):
    for stream, grad in grads:
        (param * grad).sum().backward()
        route.after_backward(stream, tokens=4)
    route.finish()


def test_upgrad_without_conflict_is_the_sum():
    model = _Model(3)
    param = model.param
    _, route = build_optimizer("upgrad", model, 1e-3, RunConfig())
    _accumulate(route, param, [("gen", torch.tensor([1.0, 0, 0])), ("und", torch.tensor([0, 2.0, 0])),
                               ("gen", torch.tensor([1.0, 0, 1]))])
    assert torch.allclose(param.grad, torch.tensor([2.0, 2.0, 1.0]), atol=1e-5)
    assert route.diagnostics()["grad_norm_und"] == 2.0


def test_upgrad_with_conflict_helps_every_stream():
    model = _Model(2)
    param = model.param
    _, route = build_optimizer("upgrad", model, 1e-3, RunConfig())
    gen, und = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 1.0])
    _accumulate(route, param, [("gen", gen), ("und", und)])
    assert param.grad @ gen >= -1e-6 and param.grad @ und >= -1e-6
    assert not torch.allclose(param.grad, gen + und)


def _fold_steps(config, grads, steps=2):
    """Two steps (the first only initialises SOAP's state); the route's diagnostics after the last."""
    model = _Model(2, 2)
    optimizer, route = build_optimizer("mlfop", model, 1e-3, config)
    for _ in range(steps):
        for stream, grad, tokens in grads:
            (model.param * grad).sum().backward()
            route.after_backward(stream, tokens=tokens)
        total = sum(grad for _, grad, _ in grads)
        assert torch.allclose(model.param.grad, total)  # the fold contract: p.grad keeps the total
        optimizer.step()
        optimizer.zero_grad()
    return route.diagnostics()


def test_mlfop_folds_every_stream_and_logs_its_diagnostics():
    grads = [("gen", torch.ones(2, 2), 4), ("und", torch.tensor([[1.0, -1], [2, 0]]), 4),
             ("text", torch.eye(2), 4)]
    diagnostics = _fold_steps(RunConfig(text_stream=True), grads)
    assert {k: round(v, 6) for k, v in diagnostics.items() if k.startswith("weights_")} == {
        "weights_gen": round(1 / 3, 6), "weights_und": round(1 / 3, 6), "weights_text": round(1 / 3, 6)}
    assert 0 <= diagnostics["conflict_fraction"] <= 1


def test_mlfop_stream_shares_follow_the_objective_unless_fold_tokens():
    grads = [("gen", torch.ones(2, 2), 16), ("und", torch.tensor([[1.0, -1], [2, 0]]), 1)]
    for config, expected in ((RunConfig(), 0.5), (RunConfig(loss_weighting="token"), 16 / 17),
                             (RunConfig(fold_tokens=True), 16 / 17)):
        assert abs(_fold_steps(config, grads)["weights_gen"] - expected) < 1e-9
