"""SOAP's pieces on their own: bases, refresh bookkeeping, moments and the update."""

import math

import torch

from mlfop.functional import (
    apply_update_,
    bias_corrected_step_size,
    first_eigenbasis,
    power_iteration_basis,
    refresh_bases_,
    rotate,
    unrotate,
)


def _spd(n, seed, dtype=torch.float64):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return a @ a.T + 0.1 * torch.eye(n, dtype=dtype)


def test_first_eigenbasis_descending_orthonormal_eigenvectors():
    f = _spd(6, 0)
    q = first_eigenbasis(f)
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=f.dtype))
    eig = torch.diagonal(q.T @ f @ q)
    assert torch.all(eig[:-1] >= eig[1:])
    torch.testing.assert_close(f @ q, q * eig)


def test_first_eigenbasis_of_zero_factor_is_finite():
    q = first_eigenbasis(torch.zeros(4, 4))
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.T @ q, torch.eye(4))


def test_power_iteration_sorts_by_estimated_eigenvalue():
    # Exact eigenvectors given in ascending order: the order must reverse them, and one
    # power-iteration step keeps each direction (up to sign).
    f = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    basis = torch.eye(4, dtype=torch.float64)
    new_basis, order = power_iteration_basis(f, basis)
    assert order.tolist() == [3, 2, 1, 0]
    torch.testing.assert_close(new_basis.abs(), torch.eye(4, dtype=torch.float64).flip(1))


def test_refresh_permutes_second_moment_with_its_direction_and_carries_momentum():
    f0 = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))  # left factor, rows
    f1 = _spd(4, 1)
    q0 = torch.eye(3, dtype=torch.float64)
    q1 = first_eigenbasis(f1)
    exp_avg = torch.randn(3, 4, dtype=torch.float64)
    exp_avg_sq = torch.arange(12, dtype=torch.float64).reshape(3, 4)  # distinct entries
    momentum_before = unrotate(exp_avg, [q0, q1])
    old_q0 = q0.clone()
    failures = refresh_bases_([f0, f1], [q0, q1], exp_avg, exp_avg_sq)
    assert failures == 0
    # Row j of V now belongs to new column j of Q0, which is old column order[j] (up to sign).
    expected_order = [1, 2, 0]
    assert torch.equal(exp_avg_sq[:, 0], torch.tensor([4.0, 8.0, 0.0], dtype=torch.float64))
    for j, old in enumerate(expected_order):
        assert abs(float(q0[:, j] @ old_q0[:, old])) > 1 - 1e-12
    # M is the same vector expressed in the new bases.
    torch.testing.assert_close(exp_avg, rotate(momentum_before, [q0, q1]))
    torch.testing.assert_close(q0.T @ q0, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(q1.T @ q1, torch.eye(4, dtype=torch.float64))


def test_bias_corrected_step_size():
    assert bias_corrected_step_size(0.1, 0.9, 0.99, 3, False) == 0.1
    expected = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    assert math.isclose(bias_corrected_step_size(0.1, 0.9, 0.99, 3, True), expected, rel_tol=1e-15)


def test_apply_update_decays_after_the_update_and_normalises():
    p = torch.tensor([1.0, 2.0], dtype=torch.float64)
    u = torch.tensor([3.0, 4.0], dtype=torch.float64)
    apply_update_(p, u, step_size=0.1, lr=0.5, weight_decay=0.2, normalize=False)
    torch.testing.assert_close(p, (torch.tensor([1.0, 2.0], dtype=torch.float64) - 0.1 * u) * (1 - 0.5 * 0.2))
    q = torch.zeros(2, dtype=torch.float64)
    apply_update_(q, u, step_size=1.0, lr=1.0, weight_decay=0.0, normalize=True, scale=2.0)
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(q, -2.0 * u / rms)


def test_apply_update_to_bf16_param_from_fp32_update():
    p = torch.ones(3, dtype=torch.bfloat16)
    apply_update_(p, torch.full((3,), 0.5), step_size=1.0, lr=1.0, weight_decay=0.0, normalize=False)
    assert p.dtype == torch.bfloat16 and torch.equal(p, torch.full((3,), 0.5, dtype=torch.bfloat16))
