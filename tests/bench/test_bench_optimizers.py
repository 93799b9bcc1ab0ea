"""The contenders: UPGrad's aggregation and FAMO's weighting through torchjd, ML-FOP-SOAP's
folding, Muon's split of the parameters."""

import io

import pytest
import torch

from mlfop.bench.config import RunConfig
from mlfop.bench.models import ModelConfig, build_model
from mlfop.bench.optimizers import build_contender

HALF = {"gen": 0.5, "und": 0.5, "text": 0.5}


def build_optimizer(name, model, lr, config, shares=HALF):
    contender = build_contender(name, model, lr, config, shares)
    return contender.optimizers[0], contender.route


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

    def hidden_matrices(self):
        return [self.param] if self.param.dim() == 2 else []


def _accumulate(route, param, grads, losses=None):
    for stream, grad in grads:
        (param * grad).sum().backward()
        route.after_backward(stream, tokens=4)
    route.finish(losses or {})


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


def test_famo_steps_along_its_weighted_stream_gradients_and_learns_from_the_remeasured_losses():
    model = _Model(2)
    param = model.param
    shares = {"gen": 0.25, "und": 0.75}
    optimizer, route = build_optimizer("famo", model, 1e-3, RunConfig(), shares)
    grad_gen, grad_und = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # grad L_k
    losses = {"gen": 2.0, "und": 0.5}
    # the buffers hold grad(c_k L_k); equal initial weights z: alpha_k = (1 / L_k) / sum_j (1 / L_j)
    _accumulate(route, param, [("gen", shares["gen"] * grad_gen), ("und", shares["und"] * grad_und)], losses)
    alpha = {k: (1 / v) / (1 / 2.0 + 1 / 0.5) for k, v in losses.items()}
    assert torch.allclose(param.grad, alpha["gen"] * grad_gen + alpha["und"] * grad_und, atol=1e-6)
    assert route.diagnostics()["famo_weight_gen"] == pytest.approx(0.5)
    # after the step generation improved a lot and understanding not at all: understanding gains weight
    route.after_step(lambda: {"gen": 1.0, "und": 0.5})
    optimizer.zero_grad()
    _accumulate(route, param, [("gen", shares["gen"] * grad_gen), ("und", shares["und"] * grad_und)], losses)
    weights = route.diagnostics()
    assert weights["famo_weight_und"] > 0.5 > weights["famo_weight_gen"]
    assert weights["famo_weight_gen"] + weights["famo_weight_und"] == pytest.approx(1.0)


def test_famo_state_resumes_exactly():
    def run(steps, resume_from=None):
        model = _Model(2)
        _, route = build_optimizer("famo", model, 1e-3, RunConfig())
        if resume_from is not None:
            route.load_state_dict(torch.load(resume_from, weights_only=False))
        for step in steps:
            _accumulate(route, model.param, [("gen", torch.ones(2)), ("und", torch.ones(2))],
                        {"gen": 2.0 - 0.1 * step, "und": 1.0})
            route.after_step(lambda: {"gen": 1.9 - 0.1 * step, "und": 0.99})
            model.param.grad = None
        return route

    whole = run(range(4)).diagnostics()
    buffer = io.BytesIO()
    torch.save(run(range(2)).state_dict(), buffer)
    buffer.seek(0)
    assert run(range(2, 4), resume_from=buffer).diagnostics() == whole


@pytest.mark.parametrize("name", ["emu3", "janus"])
def test_muon_gets_the_hidden_matrices_and_adamw_the_rest(name):
    torch.manual_seed(0)
    model = build_model(name, ModelConfig(hidden=16, layers=1, heads=2, mlp=32), codes=8, tokens=64)
    config = RunConfig(muon_adjust_lr="match_rms_adamw", muon_weight_decay=0.05, muon_ns_steps=3)
    contender = build_contender("muon", model, 0.02, config, HALF, adamw_lr=4e-3)
    muon, adamw = contender.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    inner = {id(p) for group in muon.param_groups for p in group["params"]}
    outer = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert not inner & outer and inner | outer == {id(p) for p in model.trainable_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".layers." in names[i] or "aligner" in names[i] or "proj_out" in names[i] for i in inner)
    heads = [model.hf.lm_head.weight, model.hf.get_input_embeddings().weight]
    if name == "janus":
        heads.append(model.hf.model.generation_head.vision_head.weight)
    assert all(id(p) in outer for p in heads)
    assert any(".layers.0.self_attn.q_proj" in names[i] for i in inner)
    group = muon.param_groups[0]
    assert (group["lr"], group["adjust_lr_fn"], group["weight_decay"], group["ns_steps"]) == (
        0.02, "match_rms_adamw", 0.05, 3)
    assert adamw.param_groups[0]["lr"] == 4e-3


@pytest.mark.parametrize("name", ["adamw", "soap", "mlfop", "upgrad", "famo"])
def test_outer_lr_gives_the_one_optimizer_contenders_muons_split(name):
    torch.manual_seed(0)
    model = build_model("janus", ModelConfig(hidden=16, layers=1, heads=2, mlp=32), codes=8, tokens=64)
    (optimizer,) = build_contender(name, model, 0.02, RunConfig(outer_lr=4e-3), HALF).optimizers
    inner, outer = optimizer.param_groups
    assert [id(p) for p in inner["params"]] == [id(p) for p in model.hidden_matrices()]
    hidden = {id(p) for p in model.hidden_matrices()}
    assert [id(p) for p in outer["params"]] == [id(p) for p in model.trainable_parameters() if id(p) not in hidden]
    assert (inner["lr"], outer["lr"]) == (0.02, 4e-3)
    (single,) = build_contender(name, model, 0.02, RunConfig(), HALF).optimizers
    assert len(single.param_groups) == 1 and single.param_groups[0]["lr"] == 0.02


def _fop_muon_oracle(gen, und, weights, exp_avg_sq, beta2, eps):
    """FOP in front of Muon for one matrix and K = 2, from the closed form (float64):
    g_comb = g_bar + clip(b, -1, 1) delta_perp, delta = g_gen - g_und made H-orthogonal to g_bar,
    b = <g_bar, delta_perp>_{1/h} / <delta_perp, delta_perp>_{1/h}; and the next second moment."""
    gen, und, exp_avg_sq = gen.double(), und.double(), exp_avg_sq.double()
    second = weights[0] * gen**2 + weights[1] * und**2
    h = torch.sqrt(exp_avg_sq + (1 - beta2) * (second - exp_avg_sq)) + eps
    shared = weights[0] * gen + weights[1] * und
    delta = gen - und
    delta_perp = delta - (delta * shared * h).sum() / (shared * shared * h).sum() * shared
    b = ((shared * delta_perp / h).sum() / (delta_perp * delta_perp / h).sum()).clamp(-1.0, 1.0)
    combined = shared + b * delta_perp
    return combined, exp_avg_sq + (1 - beta2) * (torch.maximum(second, combined**2) - exp_avg_sq)


def test_fop_muon_combines_each_hidden_matrix_under_an_adam_metric_and_sums_the_rest():
    torch.manual_seed(0)
    model = build_model("emu3", ModelConfig(hidden=16, layers=1, heads=2, mlp=32), codes=8, tokens=64)
    shares = {"gen": 0.25, "und": 0.75}
    config = RunConfig(betas=(0.9, 0.95))
    contender = build_contender("fop-muon", model, 0.02, config, shares, adamw_lr=3e-3)
    muon, adamw = contender.optimizers
    route = contender.route
    hidden = {id(p) for group in muon.param_groups for p in group["params"]}
    params = model.trainable_parameters()
    second_moments = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    for step in range(3):
        grads = {k: [torch.randn_like(p) for p in params] for k in shares}  # grad L_k
        for stream in shares:
            for p, g in zip(params, grads[stream]):
                p.grad = shares[stream] * g  # the stream's part of the objective
            route.after_backward(stream, tokens=4)
        route.finish({"gen": 1.0, "und": 1.0})
        bent = 0
        for p, gen, und in zip(params, grads["gen"], grads["und"]):
            if id(p) in hidden:
                expected, second_moments[id(p)] = _fop_muon_oracle(
                    gen, und, (0.25, 0.75), second_moments[id(p)], 0.95, 1e-8)
                bent += not torch.allclose(p.grad, 0.25 * gen + 0.75 * und, atol=1e-4)
            else:
                expected = (0.25 * gen + 0.75 * und).double()
            torch.testing.assert_close(p.grad.double(), expected, rtol=1e-4, atol=1e-5)
        assert bent == len(hidden) and 0 < route.diagnostics()["fop_beta_abs_mean"] <= 1
        for p in params:
            p.grad = None
    state = io.BytesIO()
    torch.save(route.state_dict(), state)
    fresh = build_contender("fop-muon", model, 0.02, config, shares, adamw_lr=3e-3).route
    fresh.load_state_dict(torch.load(io.BytesIO(state.getvalue()), weights_only=True))
    assert sum(v.numel() for v in route.exp_avg_sq) == sum(p.numel() for p in params if id(p) in hidden)
    for resumed, kept in zip(fresh.exp_avg_sq, route.exp_avg_sq):
        assert torch.equal(resumed, kept)


def test_mlfop_takes_the_bounds_of_its_correction_from_the_config():
    optimizer, _ = build_optimizer("mlfop", _Model(2, 2), 1e-3, RunConfig(beta_max=0.5, eta_range=(1.0, 1.0)))
    group = optimizer.param_groups[0]
    assert (group["beta_max"], tuple(group["eta_range"])) == (0.5, (1.0, 1.0))
