"""SOAP's pieces on their own: bases, refresh bookkeeping, moments and the update, on batches."""

import math

import pytest
import torch

from mlfop.functional import (
    apply_update_,
    bias_corrected_step_size,
    first_eigenbasis,
    power_iteration_basis,
    refresh_bases_,
    rotate,
    soap_denominator,
    unrotate,
)


def _spd(n, seed, dtype=torch.float64):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return a @ a.T + 0.1 * torch.eye(n, dtype=dtype)


def test_first_eigenbasis_descending_orthonormal_eigenvectors_for_a_batch():
    factors = torch.stack([_spd(6, seed) for seed in range(3)])
    bases, failures = first_eigenbasis(factors)
    assert failures == 0
    for f, q in zip(factors, bases):
        torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=f.dtype))
        eig = torch.diagonal(q.T @ f @ q)
        assert torch.all(eig[:-1] >= eig[1:])
        torch.testing.assert_close(f @ q, q * eig)


def test_first_eigenbasis_of_zero_factor_is_finite():
    bases, failures = first_eigenbasis(torch.zeros(1, 4, 4))
    assert failures == 0 and torch.isfinite(bases).all()
    torch.testing.assert_close(bases[0].T @ bases[0], torch.eye(4))


def test_a_failing_matrix_in_a_batch_is_the_only_one_retried_and_counted(monkeypatch):
    original = torch.linalg.eigh
    calls = []

    def eigh(matrix, *args, **kwargs):  # fails for any stack holding a NaN, in every dtype
        calls.append(tuple(matrix.shape))
        if torch.isnan(matrix).any():
            raise torch.linalg.LinAlgError("injected")
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    factors = torch.stack([_spd(3, 0), torch.full((3, 3), float("nan"), dtype=torch.float64), _spd(3, 1)])
    bases, failures = first_eigenbasis(factors)
    assert failures == 1
    assert calls == [(3, 3, 3), (3, 3), (3, 3), (3, 3)]  # the stack, then each matrix alone
    torch.testing.assert_close(bases[1], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(bases[0], original(factors[0]).eigenvectors.flip(-1))


def test_power_iteration_sorts_by_estimated_eigenvalue():
    # Exact eigenvectors given in ascending order: the order must reverse them, and one
    # power-iteration step keeps each direction (up to sign).
    f = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))[None]
    basis = torch.eye(4, dtype=torch.float64)[None]
    new_basis, order, failures = power_iteration_basis(f, basis)
    assert order.tolist() == [[3, 2, 1, 0]] and failures == 0
    torch.testing.assert_close(new_basis[0].abs(), torch.eye(4, dtype=torch.float64).flip(1))


def test_refresh_permutes_second_moment_with_its_direction_and_carries_momentum():
    f0 = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))  # left factor, rows
    f1 = _spd(4, 1)
    q0 = torch.eye(3, dtype=torch.float64)[None]
    q1 = first_eigenbasis(f1[None])[0]
    exp_avg = torch.randn(1, 3, 4, dtype=torch.float64)
    exp_avg_sq = torch.arange(12, dtype=torch.float64).reshape(1, 3, 4)  # distinct entries
    momentum_before = unrotate(exp_avg, [q0, q1])
    old_q0 = q0.clone()
    failures = refresh_bases_([f0[None], f1[None]], [q0, q1], exp_avg, exp_avg_sq)
    assert failures == 0
    # Row j of V now belongs to new column j of Q0, which is old column order[j] (up to sign).
    expected_order = [1, 2, 0]
    assert torch.equal(exp_avg_sq[0, :, 0], torch.tensor([4.0, 8.0, 0.0], dtype=torch.float64))
    for j, old in enumerate(expected_order):
        assert abs(float(q0[0, :, j] @ old_q0[0, :, old])) > 1 - 1e-12
    # M is the same vector expressed in the new bases.
    torch.testing.assert_close(exp_avg, rotate(momentum_before, [q0, q1]))
    torch.testing.assert_close(q0[0].T @ q0[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(q1[0].T @ q1[0], torch.eye(4, dtype=torch.float64))


def test_refresh_of_a_batch_equals_refreshing_each_block_alone():
    gen = torch.Generator().manual_seed(3)
    factors = [torch.stack([_spd(3, 10 + b) for b in range(2)]), torch.stack([_spd(5, 20 + b) for b in range(2)])]
    bases = [first_eigenbasis(f)[0] for f in factors]
    exp_avg = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    exp_avg_sq = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64)
    alone = [([f[b:b + 1] for f in factors], [q[b:b + 1].clone() for q in bases], exp_avg[b:b + 1].clone(),
              exp_avg_sq[b:b + 1].clone()) for b in range(2)]
    refresh_bases_(factors, bases, exp_avg, exp_avg_sq)
    for b, (f, q, m, v) in enumerate(alone):
        refresh_bases_(f, q, m, v)
        torch.testing.assert_close(m[0], exp_avg[b], rtol=1e-12, atol=1e-12)
        assert torch.equal(v[0], exp_avg_sq[b])
        for q_alone, q_batch in zip(q, bases):
            torch.testing.assert_close(q_alone[0], q_batch[b], rtol=1e-12, atol=1e-12)


def test_soap_denominator_is_the_updated_second_moment():
    v, s = torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    torch.testing.assert_close(soap_denominator(v, s, 0.9, 1e-8), (0.9 * v + 0.1 * s).sqrt() + 1e-8)
    torch.testing.assert_close(soap_denominator(v, None, 0.9, 1e-8), v.sqrt() + 1e-8)


def test_bias_corrected_step_size():
    assert bias_corrected_step_size(0.1, 0.9, 0.99, 3, False) == 0.1
    expected = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    assert math.isclose(bias_corrected_step_size(0.1, 0.9, 0.99, 3, True), expected, rel_tol=1e-15)
    # A tensor lr (float64) rounds as a Python float does.
    lr = torch.tensor(1e-2).double()
    for step in range(1, 8):
        assert float(bias_corrected_step_size(lr, 0.95, 0.95, step, True)) == bias_corrected_step_size(
            lr.item(), 0.95, 0.95, step, True)


def test_apply_update_decays_after_the_update_and_normalises_each_block():
    p = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)]
    u = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    apply_update_(p, u, step_size=0.1, lr=0.5, weight_decay=0.2, normalize=False)
    torch.testing.assert_close(p[0], (torch.tensor([1.0, 2.0], dtype=torch.float64) - 0.1 * u[0]) * (1 - 0.5 * 0.2))
    torch.testing.assert_close(p[1], (torch.tensor([0.0, 1.0], dtype=torch.float64) - 0.1 * u[1]) * (1 - 0.5 * 0.2))
    q = [torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    apply_update_(q, u, step_size=1.0, lr=1.0, weight_decay=0.0, normalize=True,
                  scale=torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(q[0], -2.0 * u[0] / math.sqrt((9 + 16) / 2))
    torch.testing.assert_close(q[1], -3.0 * u[1] / math.sqrt(1 / 2))


@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_apply_update_to_bf16_params_from_fp32_updates(shape):
    p = [torch.ones(shape, dtype=torch.bfloat16)]
    apply_update_(p, torch.full((1, *shape), 0.5), step_size=1.0, lr=1.0, weight_decay=0.0, normalize=False)
    assert p[0].dtype == torch.bfloat16 and torch.equal(p[0], torch.full(shape, 0.5, dtype=torch.bfloat16))
