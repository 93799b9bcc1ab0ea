"""The optimizer contract, run over every entry of ``contract.OPTIMIZERS``: robustness and
torch.optim compatibility of ``mlfop.SOAP`` and ``mlfop.MLFOPSOAP`` (without folds, and with two
folded streams at every step).

Covers argument validation, param groups, closures, ``maximize``, LR schedulers, state dicts and
bitwise resume (also for bf16/fp16 parameters), the zero-gradient step of
``torch.distributed.checkpoint``, the non-finite gradient policy, GradScaler, failing
``eigh``/QR and determinism. Everything runs on CPU with tiny parameters.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import contract
from contract import OPTIMIZERS

import mlfop

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(params=OPTIMIZERS, ids=lambda info: info.name)
def info(request):
    return request.param

# Key of the optimizer-wide values (skipped_steps, basis_failures) in every saved param group.
_GLOBAL_KEY = "global_state"


def _global(state_dict):
    values = [group[_GLOBAL_KEY] for group in state_dict["param_groups"]]
    assert all(v == values[0] for v in values)
    return values[0]

# Shapes of the raw parameters: 2-D, 2-D with a dimension above max_precond_dim=12, 4-D, 1-D, 0-D.
_SHAPES = [(6, 5), (20, 4), (3, 2, 3, 3), (5,), ()]
# With max_precond_dim=12 and precondition_1d=False: (6,5) -> 2 factors, (20,4) -> 1,
# (3,2,3,3) -> 4, (5,) -> 0, () -> 0.
_ROTATED_FACTORS = 7



def _raw_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in _SHAPES]


def _set_grads(params, i: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(10_000 + i)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def _run(params, opt, calls: int, start: int = 0) -> None:
    for i in range(start, start + calls):
        _set_grads(params, i)
        opt.step()


class _Net(nn.Module):
    """2-D, 1-D, 4-D and 0-D parameters and an Embedding(20, 8) (20 > max_precond_dim=12)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(2, 3, 3)
        self.lin = nn.Linear(8 + 3, 5)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, idx, img):
        e = self.emb(idx).mean(dim=1)
        c = self.conv(img).mean(dim=(2, 3))
        return self.lin(torch.cat([e, c], dim=1).tanh()) * self.gain


def _make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> _Net:
    torch.manual_seed(seed)
    return _Net().to(dtype)


def _loss(net: _Net, i: int):
    gen = torch.Generator().manual_seed(1_000 + i)
    dtype = net.lin.weight.dtype
    idx = torch.randint(0, 20, (4, 6), generator=gen)
    img = torch.randn(4, 2, 5, 5, generator=gen).to(dtype)
    target = torch.randn(4, 5, generator=gen).to(dtype)
    return ((net(idx, img) - target) ** 2).mean()


def _train(net, opt, calls: int, start: int = 0) -> None:
    for i in range(start, start + calls):
        opt.zero_grad()
        _loss(net, i).backward()
        opt.step()


def _params_of(obj) -> list[torch.Tensor]:
    return list(obj.parameters()) if isinstance(obj, nn.Module) else list(obj)


def _snapshot(params, opt) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Clones of the parameters and of every state tensor, in parameter order."""
    params = _params_of(params)
    states = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {} for p in params]
    return [p.detach().clone() for p in params], states


def _assert_same(snap_a, snap_b) -> None:
    """Bitwise equality (values and dtypes) of two snapshots."""
    (params_a, states_a), (params_b, states_b) = snap_a, snap_b
    assert len(params_a) == len(params_b)
    for n, (a, b) in enumerate(zip(params_a, params_b)):
        assert a.dtype == b.dtype, f"param {n}: {a.dtype} vs {b.dtype}"
        assert torch.equal(a, b), f"param {n} differs (max diff {(a.double() - b.double()).abs().max()})"
    for n, (sa, sb) in enumerate(zip(states_a, states_b)):
        assert sa.keys() == sb.keys(), f"param {n}: state keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, f"param {n} {key}: {sa[key].dtype} vs {sb[key].dtype}"
            assert torch.equal(sa[key], sb[key]), f"param {n} state {key} differs"


def _assert_changed(snap_a, snap_b) -> None:
    assert any(not torch.equal(a, b) for a, b in zip(snap_a[0], snap_b[0])), "parameters did not move"


def _assert_all_finite(params, opt) -> None:
    for n, p in enumerate(_params_of(params)):
        assert torch.isfinite(p).all(), f"param {n} not finite"
        for key, value in opt.state[p].items() if p in opt.state else ():
            assert torch.isfinite(value).all(), f"param {n} state {key} not finite"


def _saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _skip_warnings(records) -> list[warnings.WarningMessage]:
    return [w for w in records if issubclass(w.category, RuntimeWarning) and "skipped a step" in str(w.message)]


# ------------------------------------------------------------------ 1. argument validation

_BAD_HYPERPARAMETERS = [
    pytest.param({"lr": -1e-3}, ValueError, r"^lr must be in \[0, inf\), got -0\.001", id="lr-negative"),
    pytest.param({"lr": float("nan")}, ValueError, r"^lr must be", id="lr-nan"),
    pytest.param({"lr": "0.1"}, TypeError, r"^lr must be a real number", id="lr-str"),
    pytest.param({"eps": -1e-8}, ValueError, r"^eps must be in \(0, inf\)", id="eps-negative"),
    pytest.param({"eps": 0.0}, ValueError, r"^eps must be in \(0, inf\), got 0\.0", id="eps-zero"),
    pytest.param({"weight_decay": -0.1}, ValueError, r"^weight_decay must be in \[0, inf\)", id="wd-negative"),
    pytest.param({"betas": (1.0, 0.95)}, ValueError, r"^betas\[0\] must be in \[0, 1\), got 1\.0", id="beta1-one"),
    pytest.param({"betas": (-0.1, 0.95)}, ValueError, r"^betas\[0\] must be in \[0, 1\)", id="beta1-negative"),
    pytest.param({"betas": (0.9, 1.0)}, ValueError, r"^betas\[1\] must be in \[0, 1\), got 1\.0", id="beta2-one"),
    pytest.param({"betas": (0.9, -0.1)}, ValueError, r"^betas\[1\] must be in \[0, 1\)", id="beta2-negative"),
    pytest.param({"betas": (0.9,)}, TypeError, r"^betas must be a pair", id="betas-len1"),
    pytest.param({"betas": (0.9, 0.9, 0.9)}, TypeError, r"^betas must be a pair", id="betas-len3"),
    pytest.param({"betas": 0.9}, TypeError, r"^betas must be a pair", id="betas-float"),
    pytest.param({"betas": "ab"}, TypeError, r"^betas must be a pair", id="betas-str"),
    pytest.param({"betas": (0.9, "0.9")}, TypeError, r"^betas\[1\] must be a real number", id="betas-str-item"),
    pytest.param({"shampoo_beta": 1.0}, ValueError, r"^shampoo_beta must be in \[0, 1\)", id="shampoo-one"),
    pytest.param({"shampoo_beta": -0.1}, ValueError, r"^shampoo_beta must be in \[0, 1\)", id="shampoo-negative"),
    pytest.param({"shampoo_beta": "0.9"}, TypeError, r"^shampoo_beta must be a real number", id="shampoo-str"),
    pytest.param({"precondition_frequency": 0}, ValueError, r"^precondition_frequency must be an int >= 1, got 0", id="freq-0"),
    pytest.param({"precondition_frequency": -3}, ValueError, r"^precondition_frequency must be an int >= 1", id="freq-neg"),
    pytest.param({"precondition_frequency": 10.0}, TypeError, r"^precondition_frequency must be an int", id="freq-float"),
    pytest.param({"precondition_frequency": True}, TypeError, r"^precondition_frequency must be an int", id="freq-bool"),
    pytest.param({"max_precond_dim": -1}, ValueError, r"^max_precond_dim must be an int >= 0, got -1", id="maxdim-neg"),
    pytest.param({"max_precond_dim": 12.5}, TypeError, r"^max_precond_dim must be an int", id="maxdim-float"),
    pytest.param({"merge_dims": 1}, TypeError, r"^merge_dims must be True or False", id="merge-int"),
    pytest.param({"precondition_1d": "yes"}, TypeError, r"^precondition_1d must be True or False", id="p1d-str"),
    pytest.param({"normalize_grads": None}, TypeError, r"^normalize_grads must be True or False", id="norm-none"),
    pytest.param({"correct_bias": 0}, TypeError, r"^correct_bias must be True or False", id="bias-int"),
    pytest.param({"maximize": 1}, TypeError, r"^maximize must be True or False", id="maximize-int"),
    pytest.param({"nonfinite": "bogus"}, ValueError, r"^nonfinite must be one of \('skip', 'raise'\), got 'bogus'", id="nonfinite"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), _BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_raises_at_construction(info, kwargs, error, match):
    with pytest.raises(error, match=match):
        info.make([nn.Parameter(torch.randn(3, 3))], **kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), _BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_in_group_dict_raises(info, kwargs, error, match):
    good = {"params": [nn.Parameter(torch.randn(3, 3))]}
    with pytest.raises(error, match=match):
        info.make([good, {"params": [nn.Parameter(torch.randn(2))], **kwargs}])


@pytest.mark.parametrize(("kwargs", "error", "match"), _BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_in_add_param_group_keeps_previous_groups(info, kwargs, error, match):
    first, second = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(4, 2))
    opt = info.make([first], lr=1e-2)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [second], **kwargs})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == [first]
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    # The rejected parameter is not registered anywhere: it can be added again with good values,
    # and the optimizer still steps.
    opt.add_param_group({"params": [second]})
    assert [g["params"] for g in opt.param_groups] == [[first], [second]]
    for p in (first, second):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state) == {first, second}


_BAD_PARAMS = [
    pytest.param(lambda: torch.zeros(3, 3, dtype=torch.long), TypeError, r"floating-point.*torch\.int64", id="long"),
    pytest.param(lambda: torch.zeros(3, dtype=torch.int32), TypeError, r"floating-point.*torch\.int32", id="int32"),
    pytest.param(lambda: torch.zeros(3, 3, dtype=torch.complex64), TypeError, r"complex", id="complex"),
    pytest.param(
        lambda: torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (4,), check_invariants=True),
        TypeError,
        r"sparse",
        id="sparse-coo",
    ),
    pytest.param(lambda: torch.eye(3).to_sparse_csr(), TypeError, r"sparse", id="sparse-csr"),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(("make", "error", "match"), _BAD_PARAMS)
def test_bad_parameter_raises_at_construction_and_in_add_param_group(info, make, error, match):
    with pytest.raises(error, match=match):
        info.make([make()])
    with pytest.raises(error, match=match):
        info.make([nn.Parameter(torch.randn(2, 2)), make()])
    good = nn.Parameter(torch.randn(2, 2))
    opt = info.make([good])
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [make()]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [good]


def test_sparse_gradient_raises_at_step_without_any_change(info):
    params = _raw_params()
    opt = info.make(params, max_precond_dim=12)
    _run(params, opt, 2)
    _set_grads(params, 2)
    before = _snapshot(params, opt)
    dense = params[0].grad
    params[0].grad = dense.to_sparse()
    with pytest.raises(TypeError, match=r"does not support sparse gradients"):
        opt.step()
    _assert_same(before, _snapshot(params, opt))


@pytest.mark.parametrize(
    "params",
    [pytest.param([], id="list"), pytest.param(lambda: (p for p in ()), id="generator")],
)
def test_empty_parameter_list_raises(info, params):
    params = params() if callable(params) else params
    with pytest.raises(ValueError, match=r"SOAP got an empty parameter list"):
        info.make(params)


def test_single_tensor_instead_of_list_raises(info):
    with pytest.raises(TypeError, match=r"SOAP expects an iterable of parameters.*single Tensor"):
        info.make(nn.Parameter(torch.randn(3, 3)))


def test_good_edge_values_are_accepted(info):
    p = [nn.Parameter(torch.randn(3, 3))]
    info.make(p, lr=0.0, betas=(0.0, 0.0), shampoo_beta=0.0, weight_decay=0.0, precondition_frequency=1, max_precond_dim=0)
    info.make(p, lr=torch.tensor(1e-3), betas=[0.5, 0.999], nonfinite="raise")


# --------------------------------------------------------- 2. groups, closures, schedulers


def test_param_groups_equal_separate_optimizers(info):
    """Per-group hyper-parameters are honoured: one optimizer with two groups equals two optimizers."""
    group_a = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, precondition_frequency=2)
    group_b = dict(
        lr=5e-3, shampoo_beta=0.5, weight_decay=0.0, precondition_frequency=3,
        precondition_1d=True, normalize_grads=True, correct_bias=False,
    )
    joint_params, sep_params, same_params = _raw_params(), _raw_params(), _raw_params()
    joint = info.make(
        [{"params": joint_params[:2], **group_a}, {"params": joint_params[2:], **group_b}], max_precond_dim=12,
        **info.per_group,
    )
    sep_a = info.make(sep_params[:2], max_precond_dim=12, **group_a, **info.per_group)
    sep_b = info.make(sep_params[2:], max_precond_dim=12, **group_b, **info.per_group)
    same = info.make(same_params, max_precond_dim=12, **group_a, **info.per_group)
    for i in range(10):
        for params in (joint_params, sep_params, same_params):
            _set_grads(params, i)
        joint.step()
        sep_a.step()
        sep_b.step()
        same.step()
    (params_a, states_a), (params_b, states_b) = _snapshot(sep_params[:2], sep_a), _snapshot(sep_params[2:], sep_b)
    _assert_same(_snapshot(joint_params, joint), (params_a + params_b, states_a + states_b))
    # The second group's values made a difference (the 1-D parameter got a factor, for one).
    assert "factor_0" in joint.state[joint_params[3]]
    assert not torch.equal(joint_params[2], same_params[2])


def test_group_with_lr_zero_is_frozen_while_other_group_moves(info):
    params = _raw_params()
    frozen, moving = params[:2], params[2:]
    opt = info.make([{"params": frozen, "lr": 0.0}, {"params": moving}], lr=1e-2, weight_decay=0.1, max_precond_dim=12)
    before = [p.detach().clone() for p in params]
    _run(params, opt, 6)
    for p, b in zip(frozen, before[:2]):
        assert torch.equal(p, b)
        assert int(opt.state[p]["step"]) == 5  # its statistics still advance
    for p, b in zip(moving, before[2:]):
        assert not torch.equal(p, b)


def test_add_param_group_mid_training(info):
    base_params, new_param = _raw_params()[:3], nn.Parameter(torch.randn(4, 3))
    ref_base, ref_new = _raw_params()[:3], nn.Parameter(new_param.detach().clone())
    opt = info.make(base_params, lr=1e-2, max_precond_dim=12)
    ref_opt_base = info.make(ref_base, lr=1e-2, max_precond_dim=12)
    ref_opt_new = info.make([ref_new], lr=3e-2, weight_decay=0.0, max_precond_dim=12)
    gen = torch.Generator().manual_seed(5)
    for i in range(9):
        if i == 3:
            opt.add_param_group({"params": [new_param], "lr": 3e-2, "weight_decay": 0.0})
        _set_grads(base_params, i)
        _set_grads(ref_base, i)
        g = torch.randn(4, 3, generator=gen)
        new_param.grad, ref_new.grad = g.clone(), g.clone()
        opt.step()
        ref_opt_base.step()
        if i >= 3:
            ref_opt_new.step()
    assert opt.param_groups[1]["lr"] == 3e-2 and opt.param_groups[1]["betas"] == (0.95, 0.95)
    assert int(opt.state[new_param]["step"]) == 5  # 6 calls, the first one initialises
    _assert_same(_snapshot(base_params + [new_param], opt),
                 tuple(a + b for a, b in zip(_snapshot(ref_base, ref_opt_base), _snapshot([ref_new], ref_opt_new))))


def test_zero_grad(info):
    params = _raw_params()
    opt = info.make(params)
    _set_grads(params, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    _set_grads(params, 0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_named_parameters(info):
    named_net, plain_net = _make_net(0), _make_net(0)
    named = info.make(named_net.named_parameters(), lr=1e-2, max_precond_dim=12, precondition_frequency=4)
    plain = info.make(plain_net.parameters(), lr=1e-2, max_precond_dim=12, precondition_frequency=4)
    _train(named_net, named, 7)
    _train(plain_net, plain, 7)
    _assert_same(_snapshot(named_net, named), _snapshot(plain_net, plain))
    saved = _saved_and_loaded(named.state_dict())
    assert saved["param_groups"][0]["param_names"] == [n for n, _ in named_net.named_parameters()]
    resumed_net = _make_net(1)
    resumed_net.load_state_dict(named_net.state_dict())
    resumed = info.make(resumed_net.named_parameters(), lr=1e-2, max_precond_dim=12, precondition_frequency=4)
    resumed.load_state_dict(saved)
    _train(named_net, named, 5, start=7)
    _train(resumed_net, resumed, 5, start=7)
    _assert_same(_snapshot(named_net, named), _snapshot(resumed_net, resumed))


def test_closure_returns_loss_and_equals_manual_backward(info):
    closure_net, manual_net = _make_net(0), _make_net(0)
    closure_opt = info.make(closure_net.parameters(), lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    manual_opt = info.make(manual_net.parameters(), lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    for i in range(8):
        calls, losses = [], []

        def closure(i=i):
            closure_opt.zero_grad()
            loss = _loss(closure_net, i)
            loss.backward()  # needs grad mode although step() runs under no_grad
            calls.append(i)
            losses.append(loss)
            return loss

        returned = closure_opt.step(closure)
        assert calls == [i]
        assert returned is losses[0]
        manual_opt.zero_grad()
        manual_loss = _loss(manual_net, i)
        manual_loss.backward()
        assert manual_opt.step() is None
        assert torch.equal(returned, manual_loss)
    _assert_same(_snapshot(closure_net, closure_opt), _snapshot(manual_net, manual_opt))


def test_maximize_equals_minimising_negated_loss(info):
    max_net, min_net, plain_net = _make_net(0), _make_net(0), _make_net(0)
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    max_opt = info.make(max_net.parameters(), maximize=True, **kw)
    min_opt = info.make(min_net.parameters(), **kw)
    plain_opt = info.make(plain_net.parameters(), **kw)
    for i in range(8):
        for opt in (max_opt, min_opt, plain_opt):
            opt.zero_grad()
        _loss(max_net, i).backward()
        (-_loss(min_net, i)).backward()
        _loss(plain_net, i).backward()
        max_opt.step()
        min_opt.step()
        plain_opt.step()
    _assert_same(_snapshot(max_net, max_opt), _snapshot(min_net, min_opt))
    assert _loss(max_net, 100) > _loss(plain_net, 100)


def test_lr_scheduler_is_honoured(info):
    sched_params, manual_params, const_params = _raw_params(), _raw_params(), _raw_params()
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    sched_opt, manual_opt, const_opt = info.make(sched_params, **kw), info.make(manual_params, **kw), info.make(const_params, **kw)
    scheduler = torch.optim.lr_scheduler.StepLR(sched_opt, step_size=2, gamma=0.1)
    for i in range(8):
        manual_opt.param_groups[0]["lr"] = 1e-2 * 0.1 ** (i // 2)
        for params, opt in ((sched_params, sched_opt), (manual_params, manual_opt), (const_params, const_opt)):
            _set_grads(params, i)
            opt.step()
        scheduler.step()
    assert sched_opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    _assert_same(_snapshot(sched_params, sched_opt), _snapshot(manual_params, manual_opt))
    assert not torch.equal(sched_params[0], const_params[0])


def test_tensor_lr_equals_float_lr(info):
    tensor_params, float_params = _raw_params(), _raw_params()
    lr = torch.tensor(1e-2)  # float32: the float run must use the same (rounded) value
    tensor_opt = info.make(tensor_params, lr=lr, max_precond_dim=12, precondition_frequency=3)
    float_opt = info.make(float_params, lr=lr.item(), max_precond_dim=12, precondition_frequency=3)
    _run(tensor_params, tensor_opt, 6)
    _run(float_params, float_opt, 6)
    _assert_same(_snapshot(tensor_params, tensor_opt), _snapshot(float_params, float_opt))


# ----------------------------------------------------------------- 3. state dict / resume

_RESUME_CONFIGS = {
    "default": dict(lr=1e-2, precondition_frequency=10, max_precond_dim=12),
    "1d-merge-norm": dict(
        lr=1e-2, precondition_frequency=10, max_precond_dim=12, precondition_1d=True,
        merge_dims=True, normalize_grads=True, shampoo_beta=0.8, weight_decay=0.1,
    ),
}


def test_state_dict_survives_weights_only_load(info):
    net = _make_net(0)
    opt = info.make(net.parameters(), lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    _train(net, opt, 5)
    state_dict = opt.state_dict()
    loaded = _saved_and_loaded(state_dict)
    assert loaded.keys() == {"state", "param_groups"}
    assert _global(loaded)["kind"] == ("MLFOPSOAP" if issubclass(info.cls, mlfop.MLFOPSOAP) else "SOAP")
    assert {k: _global(loaded)[k] for k in ("skipped_steps", "basis_failures")} == {"skipped_steps": 0, "basis_failures": 0}
    assert loaded["param_groups"] == state_dict["param_groups"]
    assert loaded["state"].keys() == state_dict["state"].keys() == set(range(len(list(net.parameters()))))
    for pid, entry in state_dict["state"].items():
        assert loaded["state"][pid].keys() == entry.keys()
        for key, value in entry.items():
            assert loaded["state"][pid][key].dtype == value.dtype and torch.equal(loaded["state"][pid][key], value)
    # The layout: the embedding (20 > 12) has only its second dimension rotated, the 4-D conv
    # weight all four, the 1-D and 0-D parameters none.
    names = [n for n, _ in net.named_parameters()]
    keys = {name: set(loaded["state"][i]) for i, name in enumerate(names)}
    assert keys["emb.weight"] == {"step", "exp_avg", "exp_avg_sq", "factor_1", "basis_1"}
    assert {f"basis_{i}" for i in range(4)} <= keys["conv.weight"]
    assert keys["conv.bias"] == keys["gain"] == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("config", list(_RESUME_CONFIGS))
@pytest.mark.parametrize("k", [0, 1, 5, 10, 11])
def test_resume_is_bitwise_identical(info, k, config, tmp_path):
    """Save after k calls, rebuild model and optimizer, load, continue: same as never stopping.

    With f=10: k=5 is between refreshes, after k=10 the next call refreshes, k=11 is right after.
    """
    kwargs, total = _RESUME_CONFIGS[config], 27
    straight_net = _make_net(0)
    straight = info.make(straight_net.parameters(), **kwargs)
    _train(straight_net, straight, total)

    first_net = _make_net(0)
    first = info.make(first_net.parameters(), **kwargs)
    _train(first_net, first, k)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": first_net.state_dict(), "optimizer": first.state_dict()}, path)
    del first, first_net

    checkpoint = torch.load(path, weights_only=True)
    resumed_net = _make_net(seed=123)
    resumed = info.make(resumed_net.parameters(), **kwargs)
    resumed_net.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    if k:
        assert int(resumed.state[resumed_net.lin.weight]["step"]) == k - 1
    else:
        assert len(resumed.state) == 0
    _train(resumed_net, resumed, total - k, start=k)
    _assert_same(_snapshot(straight_net, straight), _snapshot(resumed_net, resumed))


def test_counters_are_saved_and_restored(info):
    params = _raw_params()
    opt = info.make(params, max_precond_dim=12)
    _run(params, opt, 2)
    _set_grads(params, 99)
    params[0].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    opt.basis_failures = 3  # as if three refreshes had failed
    saved = _saved_and_loaded(opt.state_dict())
    assert {k: _global(saved)[k] for k in ("skipped_steps", "basis_failures")} == {"skipped_steps": 1, "basis_failures": 3}
    fresh = info.make(_raw_params(), max_precond_dim=12)
    fresh.load_state_dict(saved)
    assert (fresh.skipped_steps, fresh.basis_failures) == (1, 3)
    assert all(_GLOBAL_KEY not in group for group in fresh.param_groups)
    # the format before the values moved into the groups: one top-level entry
    old = {"state": saved["state"], "param_groups": [{k: v for k, v in g.items() if k != _GLOBAL_KEY}
                                                     for g in saved["param_groups"]],
           _GLOBAL_KEY: {"skipped_steps": 2, "basis_failures": 5}}
    fresh.load_state_dict(old)
    assert (fresh.skipped_steps, fresh.basis_failures) == (2, 5)


def test_load_state_dict_rejects_bad_group_values_without_changing_anything(info):
    params = _raw_params()
    opt = info.make(params, lr=1e-2, max_precond_dim=12)
    _run(params, opt, 3)
    saved = _saved_and_loaded(opt.state_dict())
    saved["param_groups"][0]["betas"] = (0.9, 1.5)
    target_params = _raw_params(seed=1)
    target = info.make(target_params, lr=1e-2, max_precond_dim=12)
    _run(target_params, target, 2)
    before = _snapshot(target_params, target)
    with pytest.raises(ValueError, match=r"^betas\[1\] must be in"):
        target.load_state_dict(saved)
    _assert_same(before, _snapshot(target_params, target))
    assert target.param_groups[0]["betas"] == (0.95, 0.95)


# ------------------------------------------------------------------------ 4. bf16 / fp16


@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)],
)
def test_low_precision_state_stays_wide_through_resume(info, dtype, state_dtype):
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=4, precondition_1d=True)
    straight_params, first_params = _raw_params(dtype), _raw_params(dtype)
    straight, first = info.make(straight_params, **kw), info.make(first_params, **kw)
    _run(straight_params, straight, 16)
    _run(first_params, first, 9)
    for p in first_params:
        assert p.dtype == dtype
        state = first.state[p]
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        for key, value in state.items():
            if key != "step":
                assert value.dtype == state_dtype, f"{key} is {value.dtype}"
    saved = _saved_and_loaded(first.state_dict())
    resumed_params = [nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = info.make(resumed_params, **kw)
    resumed.load_state_dict(saved)
    _assert_same(_snapshot(first_params, first), _snapshot(resumed_params, resumed))
    _run(resumed_params, resumed, 7, start=9)
    for p in resumed_params:
        assert p.dtype == dtype
        assert all(v.dtype == state_dtype for k, v in resumed.state[p].items() if k != "step")
    _assert_same(_snapshot(straight_params, straight), _snapshot(resumed_params, resumed))


# ---------------------------------------------------------------- 5. zero-gradient steps


def test_zero_gradient_step_with_lr_zero_changes_nothing(info):
    params = _raw_params()
    opt = info.make(params, lr=1e-2, weight_decay=0.1, max_precond_dim=12, precondition_1d=True, precondition_frequency=2)
    before = [p.detach().clone() for p in params]
    for call in range(3):  # all-zero first gradients leave the parameters awaiting their first call
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before)), f"call {call}"
        _assert_all_finite(params, opt)
    assert int(opt.state[params[0]]["step"]) == -1
    # After real training too.
    opt.param_groups[0]["lr"] = 1e-2
    _run(params, opt, 5)
    trained = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, trained))
    _assert_all_finite(params, opt)


def test_zero_gradients_on_first_calls_with_positive_lr_give_no_nan(info):
    params = _raw_params()
    lr, wd = 1e-2, 0.1
    opt = info.make(params, lr=lr, weight_decay=wd, max_precond_dim=12, precondition_1d=True, precondition_frequency=2)
    before = [p.detach().clone() for p in params]
    for _ in range(3):  # an all-zero gradient carries nothing to initialise from: no step, no decay
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        _assert_all_finite(params, opt)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for state in opt.state.values():
        assert torch.equal(state["exp_avg"], torch.zeros_like(state["exp_avg"]))
        assert torch.equal(state["exp_avg_sq"], torch.zeros_like(state["exp_avg_sq"]))
    for state in opt.state.values():  # the bases are still orthonormal
        for key in [k for k in state if k.startswith("basis_")]:
            basis = state[key]
            assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[0]), atol=1e-6)
    snap = _snapshot(params, opt)
    _run(params, opt, 6)
    _assert_all_finite(params, opt)
    _assert_changed(snap, _snapshot(params, opt))


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_dcp_get_optimizer_state_dict_on_fresh_optimizer(info, tensor_lr):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    net = _make_net(0)
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    opt = info.make(net.parameters(), lr=lr, weight_decay=0.1, max_precond_dim=12)
    before = [p.detach().clone() for p in net.parameters()]
    state_dict = get_optimizer_state_dict(net, opt)  # runs a zero-gradient step at lr=0
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    names = [n for n, _ in net.named_parameters()]
    assert set(state_dict["state"]) == set(names)
    for name, entry in state_dict["state"].items():
        for key, value in entry.items():
            assert torch.isfinite(value).all(), f"{name} {key}"
    _assert_all_finite(net, opt)
    assert (opt.skipped_steps, opt.basis_failures) == (0, 0)
    _train(net, opt, 12)
    _assert_all_finite(net, opt)
    # The zero step did not use up SOAP's first call: training continues as without it.
    untouched = _make_net(0)
    reference = info.make(untouched.parameters(), lr=lr, weight_decay=0.1, max_precond_dim=12)
    _train(untouched, reference, 12)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), untouched.parameters()))


def test_dcp_set_optimizer_state_dict_round_trip_is_bitwise(info):
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=5, precondition_1d=True)
    first_net = _make_net(0)
    first = info.make(first_net.parameters(), **kw)
    _train(first_net, first, 7)
    model_sd = copy.deepcopy(get_model_state_dict(first_net))
    optim_sd = copy.deepcopy(get_optimizer_state_dict(first_net, first))
    assert "lin.weight" in optim_sd["state"]  # fully qualified names, not integer ids

    resumed_net = _make_net(seed=7)
    resumed = info.make(resumed_net.parameters(), **kw)
    set_model_state_dict(resumed_net, model_sd)
    set_optimizer_state_dict(resumed_net, resumed, optim_sd)
    _assert_same(_snapshot(first_net, first), _snapshot(resumed_net, resumed))
    _train(first_net, first, 9, start=7)
    _train(resumed_net, resumed, 9, start=7)
    _assert_same(_snapshot(first_net, first), _snapshot(resumed_net, resumed))


# --------------------------------------------------------------- 6. non-finite gradients

_F = 3  # refresh at step t = 3, i.e. call 4; call 3 (t = 2) is between refreshes


def _poison_grads(params, i: int) -> None:
    _set_grads(params, i)
    params[0].grad[1, 2] = float("nan")
    params[2].grad[0, 1, 2, 0] = float("inf")
    params[4].grad.fill_(-float("inf"))


@pytest.mark.parametrize("bad_call", [1, 3, 4], ids=["first-call", "between-refreshes", "refresh-call"])
def test_nonfinite_gradient_is_skipped_without_any_change(info, bad_call):
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=_F, precondition_1d=True)
    ref_params, params = _raw_params(), _raw_params()
    ref, opt = info.make(ref_params, **kw), info.make(params, **kw)
    _run(ref_params, ref, 7)

    _run(params, opt, bad_call - 1)
    for refused in (1, 2):
        before = _snapshot(params, opt)
        _poison_grads(params, 50 + refused)
        if refused == 2:  # a NaN only, in a single gradient
            _set_grads(params, 60)
            params[3].grad[4] = float("nan")
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            assert opt.step() is None
        skip_warnings = _skip_warnings(records)
        assert len(skip_warnings) == 1 and len([w for w in records if w.category is RuntimeWarning]) == 1
        assert f"({refused} step(s) skipped so far)" in str(skip_warnings[0].message)
        assert opt.skipped_steps == refused
        _assert_same(before, _snapshot(params, opt))
        if bad_call == 1:
            assert len(opt.state) == 0
    _run(params, opt, 7 - (bad_call - 1), start=bad_call - 1)
    _assert_same(_snapshot(ref_params, ref), _snapshot(params, opt))
    assert opt.skipped_steps == 2 and ref.skipped_steps == 0
    assert _global(opt.state_dict())["skipped_steps"] == 2


@pytest.mark.parametrize("bad_call", [1, 3, 4], ids=["first-call", "between-refreshes", "refresh-call"])
def test_nonfinite_gradient_raises_without_any_change(info, bad_call):
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=_F, nonfinite="raise")
    ref_params, params = _raw_params(), _raw_params()
    ref, opt = info.make(ref_params, **kw), info.make(params, **kw)
    _run(ref_params, ref, 7)
    _run(params, opt, bad_call - 1)
    before = _snapshot(params, opt)
    _poison_grads(params, 50)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        match = r"3 of 5 gradients are not finite.*no parameter or state was changed"
        with pytest.raises(FloatingPointError, match=match):
            opt.step()
    assert not _skip_warnings(records)
    assert opt.skipped_steps == 0
    _assert_same(before, _snapshot(params, opt))
    _run(params, opt, 7 - (bad_call - 1), start=bad_call - 1)
    _assert_same(_snapshot(ref_params, ref), _snapshot(params, opt))


def test_nonfinite_with_closure_and_maximize_still_returns_loss(info):
    params = _raw_params()
    opt = info.make(params, maximize=True, max_precond_dim=12)
    _run(params, opt, 2)
    before = _snapshot(params, opt)

    def closure():
        _poison_grads(params, 3)
        return torch.tensor(1.5)

    with pytest.warns(RuntimeWarning, match="skipped a step"):
        assert opt.step(closure) == 1.5
    _assert_same(before, _snapshot(params, opt))


def test_grad_scaler_skips_inf_step_and_resumes(info):
    ref_net, net = _make_net(0), _make_net(0)
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    ref, opt = info.make(ref_net.parameters(), **kw), info.make(net.parameters(), **kw)
    _train(ref_net, ref, 7)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()

    def scaled_step(i, poison=False):
        opt.zero_grad()
        scaler.scale(_loss(net, i)).backward()
        if poison:
            net.lin.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    for i in range(4):
        scaled_step(i)
    scale = scaler.get_scale()
    before = _snapshot(net, opt)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        scaled_step(99, poison=True)
    assert not _skip_warnings(records)  # the scaler, not the optimizer, refused the step
    assert scaler.get_scale() == scale / 2
    assert opt.skipped_steps == 0
    _assert_same(before, _snapshot(net, opt))
    for i in range(4, 7):
        scaled_step(i)
    # Power-of-two scaling is exact: the scaled run equals the plain one that never saw the inf.
    _assert_same(_snapshot(ref_net, ref), _snapshot(net, opt))


# ----------------------------------------------------------------- 7. eigh / QR failures

def _failing(original, *, fail_dtypes, mode, calls, sizes=None):
    """Wrap a torch.linalg function: fail (raise or return NaN) for the given dtypes/sizes."""

    def wrapper(matrix, *args, **kwargs):
        calls.append((matrix.dtype, matrix.shape[-1]))
        if matrix.dtype in fail_dtypes and (sizes is None or matrix.shape[-1] in sizes):
            if mode == "raise":
                raise torch.linalg.LinAlgError("injected failure")
            result = original(matrix, *args, **kwargs)
            return type(result)(tuple(torch.full_like(t, float("nan")) for t in result))
        return original(matrix, *args, **kwargs)

    return wrapper


def _rotated(opt, params):
    """``(param index, dim)`` of every rotated dimension."""
    return [(n, int(k.split("_")[1])) for n, p in enumerate(params) for k in opt.state[p] if k.startswith("basis_")]


def _assert_orthonormal(basis, atol=1e-5):
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[0], dtype=basis.dtype), atol=atol)


def _assert_same_columns_up_to_sign(a, b, atol=1e-4):
    assert torch.allclose((a.T @ b).abs(), torch.eye(a.shape[0], dtype=a.dtype), atol=atol)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_eigh_float32_failure_uses_float64(info, monkeypatch, mode):
    original = torch.linalg.eigh
    normal_params, params = _raw_params(), _raw_params()
    normal, opt = info.make(normal_params, max_precond_dim=12), info.make(params, max_precond_dim=12)
    _run(normal_params, normal, 1)
    calls = []
    monkeypatch.setattr(torch.linalg, "eigh", _failing(original, fail_dtypes={torch.float32}, mode=mode, calls=calls))
    _run(params, opt, 1)
    rotated = _rotated(opt, params)
    assert len(rotated) == _ROTATED_FACTORS
    # Each factor: one float32 attempt (fails), one float64 retry.
    assert [dtype for dtype, _ in calls] == [torch.float32, torch.float64] * _ROTATED_FACTORS
    assert opt.basis_failures == 0
    for n, dim in rotated:
        state = opt.state[params[n]]
        factor, basis = state[f"factor_{dim}"], state[f"basis_{dim}"]
        assert torch.equal(factor, normal.state[normal_params[n]][f"factor_{dim}"])
        expected = original(factor.double()).eigenvectors.flip(-1).to(torch.float32)
        assert basis.dtype == torch.float32 and torch.equal(basis, expected)
        _assert_orthonormal(basis)
        _assert_same_columns_up_to_sign(basis, normal.state[normal_params[n]][f"basis_{dim}"])
    _run(params, opt, 5, start=1)
    _assert_all_finite(params, opt)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_qr_float32_failure_uses_float64(info, monkeypatch, mode):
    original = torch.linalg.qr
    kw = dict(max_precond_dim=12, precondition_frequency=_F)
    normal_params, params = _raw_params(), _raw_params()
    normal, opt = info.make(normal_params, **kw), info.make(params, **kw)
    _run(normal_params, normal, _F + 1)
    _run(params, opt, _F)
    old = {(n, d): opt.state[params[n]][f"basis_{d}"].clone() for n, d in _rotated(opt, params)}
    calls = []
    monkeypatch.setattr(torch.linalg, "qr", _failing(original, fail_dtypes={torch.float32}, mode=mode, calls=calls))
    _run(params, opt, 1, start=_F)  # step t = f: refresh
    assert len(calls) == 2 * _ROTATED_FACTORS
    assert opt.basis_failures == 0
    for (n, dim), old_basis in old.items():
        state = opt.state[params[n]]
        factor, basis = state[f"factor_{dim}"], state[f"basis_{dim}"]
        product = (factor[None] @ old_basis[None])[0]  # the batched product the step uses
        order = torch.argsort((old_basis * product).sum(dim=0), descending=True)
        expected = original(product.index_select(1, order).double()).Q.to(torch.float32)
        assert torch.equal(basis, expected), (n, dim)
        assert not torch.equal(basis, old_basis)
        _assert_orthonormal(basis)
        _assert_same_columns_up_to_sign(basis, normal.state[normal_params[n]][f"basis_{dim}"])
    _run(params, opt, 4, start=_F + 1)
    _assert_all_finite(params, opt)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_eigh_failing_in_every_dtype_keeps_identity(info, monkeypatch, mode):
    original = torch.linalg.eigh
    params = _raw_params()
    opt = info.make(params, max_precond_dim=12, precondition_frequency=_F)
    monkeypatch.setattr(
        torch.linalg, "eigh",
        _failing(original, fail_dtypes={torch.float32, torch.float64}, mode=mode, calls=[]),
    )
    _run(params, opt, 1)
    assert opt.basis_failures == _ROTATED_FACTORS
    for n, dim in _rotated(opt, params):
        basis = opt.state[params[n]][f"basis_{dim}"]
        assert torch.equal(basis, torch.eye(basis.shape[0]))
    _assert_all_finite(params, opt)
    snap = _snapshot(params, opt)
    _run(params, opt, 2 * _F, start=1)  # training continues; the refreshes (QR) still work
    _assert_all_finite(params, opt)
    _assert_changed(snap, _snapshot(params, opt))
    assert opt.basis_failures == _ROTATED_FACTORS
    assert any(not torch.equal(opt.state[params[n]][f"basis_{d}"], snap[1][n][f"basis_{d}"])
               for n, d in _rotated(opt, params))


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_qr_failing_in_every_dtype_keeps_previous_basis(info, monkeypatch, mode):
    original = torch.linalg.qr
    no_refresh_params, params = _raw_params(), _raw_params()
    # The reference never refreshes; up to the refresh step both runs take identical updates.
    no_refresh = info.make(no_refresh_params, max_precond_dim=12, precondition_frequency=1000)
    opt = info.make(params, max_precond_dim=12, precondition_frequency=_F)
    _run(no_refresh_params, no_refresh, _F + 1)
    _run(params, opt, _F)
    before = _snapshot(params, opt)
    monkeypatch.setattr(
        torch.linalg, "qr",
        _failing(original, fail_dtypes={torch.float32, torch.float64}, mode=mode, calls=[]),
    )
    _run(params, opt, 1, start=_F)  # the refresh fails for every factor
    assert opt.basis_failures == _ROTATED_FACTORS
    after = _snapshot(params, opt)
    reference = _snapshot(no_refresh_params, no_refresh)
    for n, p in enumerate(params):
        assert torch.equal(after[0][n], reference[0][n])
        for key in after[1][n]:
            if key.startswith("basis_"):
                assert torch.equal(after[1][n][key], before[1][n][key])  # previous basis, exactly
            elif key == "exp_avg":  # carried through unrot/rot with the same bases: rounding only
                assert torch.allclose(after[1][n][key], reference[1][n][key], rtol=1e-5, atol=1e-7)
            else:  # exp_avg_sq (not permuted), factors, step
                assert torch.equal(after[1][n][key], reference[1][n][key]), (n, key)
    _assert_all_finite(params, opt)
    _run(params, opt, _F, start=_F + 1)  # a second failed refresh
    assert opt.basis_failures == 2 * _ROTATED_FACTORS
    monkeypatch.setattr(torch.linalg, "qr", original)
    _run(params, opt, _F, start=2 * _F + 1)  # a working refresh
    assert opt.basis_failures == 2 * _ROTATED_FACTORS
    _assert_all_finite(params, opt)
    assert not torch.equal(opt.state[params[0]]["basis_0"], before[1][0]["basis_0"])


def test_qr_failing_for_one_dimension_refreshes_only_the_other(info):
    """(6, 5) parameter: the 6x6 refresh fails, the 5x5 one succeeds; V is permuted along dim 1 only."""
    original = torch.linalg.qr
    params = [nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)))]
    ref_params = [nn.Parameter(params[0].detach().clone())]
    opt = info.make(params, max_precond_dim=12, precondition_frequency=_F)
    no_refresh = info.make(ref_params, max_precond_dim=12, precondition_frequency=1000)
    _run(params, opt, _F)
    _run(ref_params, no_refresh, _F + 1)
    old = _snapshot(params, opt)[1][0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "qr", _failing(
            original, fail_dtypes={torch.float32, torch.float64}, mode="raise", calls=[], sizes={6}))
        _run(params, opt, 1, start=_F)
    assert opt.basis_failures == 1
    state, ref_state = opt.state[params[0]], no_refresh.state[ref_params[0]]
    assert torch.equal(state["basis_0"], old["basis_0"])
    assert not torch.equal(state["basis_1"], old["basis_1"])
    product = state["factor_1"] @ old["basis_1"]
    order = torch.argsort((old["basis_1"] * product).sum(dim=0), descending=True)
    assert not torch.equal(order, torch.arange(5))  # the permutation is not trivial here
    assert torch.equal(state["exp_avg_sq"], ref_state["exp_avg_sq"].index_select(1, order))


# ------------------------------------------------------------------------ 8. determinism


def test_same_seed_gives_bitwise_identical_runs(info):
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=5, precondition_1d=True)
    runs = []
    for seed in (0, 0, 1):
        net = _make_net(seed)
        opt = info.make(net.parameters(), **kw)
        _train(net, opt, 25)
        runs.append(_snapshot(net, opt))
    _assert_same(runs[0], runs[1])
    assert not torch.equal(runs[0][0][0], runs[2][0][0])


def test_skip_warning_points_at_the_callers_line(info):
    param = torch.nn.Parameter(torch.ones(3, 3))
    opt = info.make([param])
    param.grad = torch.full((3, 3), float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step") as record:
        opt.step()
    assert record[0].filename == (contract.__file__ if info.folds else __file__)  # the caller of step()


# ------------------------------------------------------------------ 8. bad input, Core v2


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("magnitude", [1e20, 3e38])
def test_a_finite_gradient_whose_squares_overflow_is_refused_without_any_change(info, policy, magnitude):
    params = _raw_params()
    opt = info.make(params, max_precond_dim=12, nonfinite=policy)
    _run(params, opt, 3)
    _set_grads(params, 3)
    params[0].grad[0, 0] = magnitude  # finite, but its square is not (float32 max ~3.4e38)
    before = _snapshot(params, opt)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="squares overflow"):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match="squares overflow"):
            opt.step()
    _assert_same(before, _snapshot(params, opt))
    _run(params, opt, 3, start=4)
    _assert_all_finite(params, opt)


def test_a_large_but_safe_gradient_is_stepped_without_nan(info):
    params = _raw_params()
    opt = info.make(params, max_precond_dim=12)
    _run(params, opt, 2)
    _set_grads(params, 2, scale=1e12)  # r^2 h would overflow float32 in a naive Gram matrix
    opt.step()
    _assert_all_finite(params, opt)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("eps", [1e-46, 1e-300])
def test_an_eps_that_rounds_to_zero_in_float32_is_refused(info, eps):
    with pytest.raises(ValueError, match="eps must be representable in float32"):
        info.make(_raw_params(), eps=eps)


def _trained(info, params, calls=3):
    opt = info.make(params, max_precond_dim=12)
    _run(params, opt, calls)
    return opt


def test_load_state_dict_of_a_model_with_other_shapes_is_refused_and_changes_nothing(info):
    target_params = _raw_params()
    target = _trained(info, target_params)
    before = _snapshot(target_params, target), copy.deepcopy(target.param_groups[0]["lr"])
    other = [nn.Parameter(torch.randn((7, 5) if p.dim() == 2 and p.shape == (6, 5) else p.shape)) for p in _raw_params()]
    saved = _trained(info, other).state_dict()
    with pytest.raises(ValueError, match=r"has exp_avg of shape \(7, 5\), expected \(6, 5\)"):
        target.load_state_dict(saved)
    _assert_same(before[0], _snapshot(target_params, target))
    _run(target_params, target, 2, start=3)  # and it still steps
    _assert_all_finite(target_params, target)


def test_load_state_dict_of_another_optimizer_is_refused(info):
    params = _raw_params()
    opt = _trained(info, params)
    adamw = torch.optim.AdamW(_raw_params(), lr=1e-3)
    for p in adamw.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    adamw.step()
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match="keys"):
        opt.load_state_dict(adamw.state_dict())
    _assert_same(before, _snapshot(params, opt))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["global_state"] = {**group["global_state"], "kind": "Shampoo"}
    with pytest.raises(ValueError, match=r"checkpoint is of \['Shampoo'\]"):
        opt.load_state_dict(saved)


def test_a_soap_checkpoint_loads_into_mlfopsoap_and_continues_as_soap(info):
    """A SOAP state has no FOP values in its groups; they take the loading optimizer's."""
    straight_params, first_params, resumed_params = _raw_params(), _raw_params(), _raw_params()
    straight = mlfop.SOAP(straight_params, max_precond_dim=12)
    _run(straight_params, straight, 9)
    first = mlfop.SOAP(first_params, max_precond_dim=12)
    _run(first_params, first, 5)
    resumed = info.make(resumed_params, max_precond_dim=12)
    with torch.no_grad():
        for p, q in zip(resumed_params, first_params):
            p.copy_(q)
    resumed.load_state_dict(_saved_and_loaded(first.state_dict()))
    _run(resumed_params, resumed, 4, start=5)
    _assert_all_finite(resumed_params, resumed)
    if not info.folds:  # without folds ML-FOP-SOAP is SOAP: the resumed run is the straight one
        _assert_same(_snapshot(straight_params, straight), _snapshot(resumed_params, resumed))


def test_bfloat16_moments_halve_them_keep_the_rest_wide_and_resume_bitwise(info):
    kw = dict(lr=1e-2, max_precond_dim=12, precondition_frequency=3)
    wide_params, narrow_params = _raw_params(), _raw_params()
    wide = info.make(wide_params, **kw)
    narrow = info.make(narrow_params, state_dtype=torch.bfloat16, **kw)
    _run(wide_params, wide, 8)
    _run(narrow_params, narrow, 8)
    for p in narrow_params:
        state = narrow.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert all(state[k].dtype == torch.float32 for k in state if k.startswith(("factor", "basis")))
    moment_bytes = lambda o: sum(o.state[p][k].nbytes for p in o.state for k in ("exp_avg", "exp_avg_sq"))  # noqa: E731
    assert 2 * moment_bytes(narrow) == moment_bytes(wide)
    start = _raw_params()
    moved = sum(float((p - q).norm()) for p, q in zip(wide_params, start))
    gap = sum(float((p - q).norm()) for p, q in zip(narrow_params, wide_params))
    assert 0 < gap < 0.05 * moved  # rounding of the moments, not another algorithm
    saved = _saved_and_loaded(narrow.state_dict())
    resumed_params = [nn.Parameter(p.detach().clone()) for p in narrow_params]
    resumed = info.make(resumed_params, state_dtype="bfloat16", **kw)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_params[0]]["exp_avg"].dtype == torch.bfloat16
    _run(narrow_params, narrow, 4, start=8)
    _run(resumed_params, resumed, 4, start=8)
    _assert_same(_snapshot(narrow_params, narrow), _snapshot(resumed_params, resumed))


def test_a_bad_state_dtype_is_refused(info):
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        info.make(_raw_params(), state_dtype=torch.float16)
