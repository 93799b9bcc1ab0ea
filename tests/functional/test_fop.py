"""The Fisher-orthogonal combination on its own, against the published K = 2 formulas."""

import itertools

import pytest
import torch

from mlfop.functional.fop import (
    SystemTotals,
    combination_coefficients,
    combine,
    combine_block,
    fop_system,
    global_beta,
    gram_step_scale,
    noise_shrinkage,
    solve_beta,
    stream_grams,
    symmetric_eigh,
)


def _inner(a, b, metric):
    return float((a * b * metric).sum())


def _system(rotated, h, weights, eps_fop=0.0):
    """The system of one block (a batch of one) from streams ``(K, *shape)`` and ``h``."""
    flat = rotated.reshape(1, rotated.shape[0], -1)
    return flat, fop_system(*stream_grams(flat, h.reshape(1, -1)), weights, eps_fop)


def _general(rotated, h, weights, beta_max=1e9, eta_range=(1e-9, 1e9)):
    flat, system = _system(rotated, h, weights)
    beta = solve_beta(system.d, system.e, system.spread, system.spread_reference, beta_max)
    coefficients = combination_coefficients(system, beta)
    comb = combine(flat, coefficients).view(rotated.shape[1:])
    return system, beta[0], comb, float(gram_step_scale(system, coefficients, eta_range)[0])


def _closed_form_two_streams(r1, r2, h, w1, beta_max=1e9):
    """FOP as published (Lu & Armour 2025), written out on tensors."""
    avg = w1 * r1 + (1 - w1) * r2
    diff = r1 - r2
    s = _inner(diff, avg, h) / _inner(avg, avg, h)
    perp = diff - s * avg
    beta = _inner(avg, perp, 1 / h) / _inner(perp, perp, 1 / h)
    beta = max(-beta_max, min(beta_max, beta))
    return avg, perp, beta, avg + beta * perp


def _streams(k, shape=(6, 5), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(shape, generator=gen, dtype=dtype)
    rotated = torch.stack([common + 0.7 * torch.randn(shape, generator=gen, dtype=dtype) for _ in range(k)])
    h = torch.rand(shape, generator=gen, dtype=dtype) + 0.1
    return rotated, h


@pytest.mark.parametrize("w1", [0.5, 0.8, 0.3])
@pytest.mark.parametrize("beta_max", [1e9, 0.05])
def test_general_solver_matches_the_two_stream_closed_form(w1, beta_max):
    rotated, h = _streams(2)
    _, _, expected_beta, expected = _closed_form_two_streams(rotated[0], rotated[1], h, w1, beta_max)
    _, beta, comb, _ = _general(rotated, h, torch.tensor([w1, 1 - w1], dtype=torch.float64), beta_max)
    torch.testing.assert_close(comb, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(beta, torch.tensor([expected_beta, -expected_beta], dtype=torch.float64))


def test_perpendicular_components_are_h_orthogonal_to_the_shared_one():
    rotated, h = _streams(3, seed=1)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    flat, system = _system(rotated, h, weights)
    avg = combine(flat, system.weights)[0]
    for k in range(3):
        perp = combine(flat, system.perp[0, :, k])[0]
        assert abs(_inner(perp, avg, h.flatten())) < 1e-12 * _inner(avg, avg, h.flatten())
    # The streams' perpendicular parts sum to zero with the weights: the singular direction of E.
    torch.testing.assert_close(system.e[0] @ weights, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_beta_minimises_fop_objective_by_line_search():
    """f(b) = -b <g, g_perp>_Hinv + b^2/2 <g_perp, g_perp>_Hinv, evaluated on tensors."""
    rotated, h = _streams(2, seed=2)
    avg, perp, beta, _ = _closed_form_two_streams(rotated[0], rotated[1], h, 0.5)
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    d, e = _inner(avg, perp, 1 / h), _inner(perp, perp, 1 / h)
    objective = -grid * d + 0.5 * grid**2 * e
    best = float(grid[objective.argmin()])
    _, general_beta, _, _ = _general(rotated, h, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert abs(best - float(general_beta[0])) <= 1e-4
    assert abs(beta - float(general_beta[0])) <= 1e-10


def test_step_scale_formula_and_clipping():
    rotated, h = _streams(2, seed=3)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    _, _, comb, eta = _general(rotated, h, weights)
    avg = 0.5 * (rotated[0] + rotated[1])
    expected = _inner(avg, comb, 1 / h) / _inner(comb, comb, 1 / h)
    assert abs(eta - expected) < 1e-12
    assert 1 / 3 <= eta <= 1.0  # the two-stream bound documented in FOPConfig
    _, _, _, clipped = _general(rotated, h, weights, eta_range=(0.99, 1.0))
    assert clipped == 0.99 if expected < 0.99 else clipped == expected


def test_agreeing_or_zero_streams_give_no_correction():
    rotated, h = _streams(1, seed=4)
    same = torch.cat([rotated, rotated])
    _, beta, comb, eta = _general(same, h, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(beta, torch.zeros(2, dtype=torch.float64)) and eta == 1.0
    assert torch.equal(comb, rotated[0])  # 0.5 r + 0.5 r = r exactly
    zeros = torch.zeros(2, 4, 3, dtype=torch.float64)
    _, beta, comb, eta = _general(zeros, torch.ones(4, 3, dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(comb, torch.zeros(4, 3, dtype=torch.float64)) and eta == 1.0


def test_three_streams_are_permutation_equivariant_and_stable_to_rounding():
    rotated, h = _streams(3, seed=5, dtype=torch.float32)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    _, _, reference, _ = _general(rotated, h, weights, beta_max=1.0)
    for order in itertools.permutations(range(3)):
        _, _, comb, _ = _general(rotated[list(order)], h, weights[list(order)], beta_max=1.0)
        torch.testing.assert_close(comb, reference, rtol=1e-5, atol=1e-6)
    # A rounding-level change of the streams moves the combination only at rounding level
    # (the measured failure mode of a tiny-cutoff pseudo-inverse: sign flips, jumps to the clip).
    nudged = rotated * (1 + 1e-7 * torch.randn(rotated.shape, generator=torch.Generator().manual_seed(9)))
    _, _, comb, _ = _general(nudged, h, weights, beta_max=1.0)
    assert float((comb - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize("k", [3, 4])
def test_k_greater_than_two_solves_the_normal_equations(k):
    rotated, h = _streams(k, seed=6)
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    system, beta, _, _ = _general(rotated, h, weights)
    torch.testing.assert_close(system.e[0] @ beta, system.d[0], atol=1e-9, rtol=1e-9)
    assert abs(float(beta.sum())) < 1e-12


def test_streams_that_agree_to_float32_rounding_get_no_correction():
    """Two streams equal up to the rounding of gradient accumulation ((3G - 2G) against G, in
    float32), rotated into the eigenbasis of G's own factors, where the shared component is
    diagonal and every other coordinate is tiny (SOAP's first-step metric h = |r|). Rotation
    spreads the rounding into those coordinates, where the H^-1 metric amplifies it into an
    apparent disagreement; the plain-metric check recognises it as rounding."""
    from mlfop.functional.rotation import rotate

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(16, 12, generator=gen)
    streams = torch.stack([grad, (3 * grad) - (2 * grad)])
    assert 0 < float((streams[0] - streams[1]).norm() / grad.norm()) < 1e-6
    left, _, right_t = torch.linalg.svd(grad.double())
    rotated = rotate(streams, [left.float(), right_t.T.float()])
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    h = torch.tensordot(weights.float(), rotated, dims=1).abs() + 1e-8
    gram_e, gram_h, gram_hinv = stream_grams(rotated.reshape(1, 2, -1), h.reshape(1, -1))
    plain = fop_system(gram_e, gram_h, gram_hinv, weights, 0.0)
    assert torch.equal(solve_beta(plain.d, plain.e, plain.spread, plain.spread_reference, 1.0), torch.zeros(1, 2))
    hinv_only = fop_system(gram_hinv, gram_h, gram_hinv, weights, 0.0)  # spread judged under H^-1
    beta = solve_beta(hinv_only.d, hinv_only.e, hinv_only.spread, hinv_only.spread_reference, 1.0)
    assert float(beta.abs().max()) > 1e-3  # the H^-1 check takes the rounding for a conflict


def test_a_batch_equals_its_blocks_one_at_a_time():
    blocks = [_streams(2, seed=10 + b) for b in range(3)]
    flat = torch.stack([r.reshape(2, -1) for r, _ in blocks])
    h = torch.stack([h.reshape(-1) for _, h in blocks])
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)
    second_moment = (flat.square() * weights.view(1, 2, 1)).sum(1)
    batched = combine_block(flat, second_moment, fop_system(*stream_grams(flat, h), weights, 0.0),
                            beta_max=1.0, eta_range=(1 / 3, 1.0))
    for b in range(3):
        alone = combine_block(flat[b:b + 1], second_moment[b:b + 1],
                              fop_system(*stream_grams(flat[b:b + 1], h[b:b + 1]), weights, 0.0),
                              beta_max=1.0, eta_range=(1 / 3, 1.0))
        torch.testing.assert_close(alone.momentum[0], batched.momentum[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alone.eta[0], batched.eta[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alone.beta[0], batched.beta[b], rtol=1e-12, atol=1e-12)


def test_grams_of_huge_streams_stay_finite_and_exact():
    rotated, h = _streams(2, seed=7, dtype=torch.float32)
    flat = rotated.reshape(1, 2, -1)
    small = stream_grams(flat, h.reshape(1, -1))
    huge = stream_grams(flat * 1e15, h.reshape(1, -1) * 1e15)  # r^2 h ~ 1e45 overflows float32
    for a, b, power in zip(small, huge, (2, 3, 1)):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b / 1e15**power, a, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_symmetric_eigh_reconstructs_batches_of_small_matrices(n):
    a = torch.randn(40, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    a = a + a.mT
    values, vectors = symmetric_eigh(a)
    torch.testing.assert_close(vectors @ torch.diag_embed(values) @ vectors.mT, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(n, dtype=torch.float64).expand_as(a), rtol=0, atol=1e-12)


def test_global_beta_solves_the_summed_systems():
    systems = [_system(*_streams(2, seed=20 + b), torch.tensor([0.5, 0.5], dtype=torch.float64))[1] for b in range(3)]
    totals = SystemTotals.zeros(2, torch.device("cpu"))
    for system in systems:
        totals.add(system)
    d = sum(s.d[0] for s in systems)
    e = sum(s.e[0] for s in systems)
    beta_raw, beta = global_beta(totals, torch.tensor([0.5, 0.5], dtype=torch.float64), 1e9, shrink=False)
    assert torch.equal(beta_raw, beta)
    torch.testing.assert_close(e @ beta_raw, d, rtol=1e-10, atol=1e-12)  # the normal equations of the sums
    assert float(beta_raw.sum()) == pytest.approx(0.0, abs=1e-15)
    assert int(totals.blocks) == 3


def test_noise_shrinkage_formula_and_edges():
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    gram = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # spread 0.5*(4+2) - 2 = 1
    rho, fraction = noise_shrinkage(torch.tensor([1.0, 1.0], dtype=torch.float64), gram, w)
    assert float(fraction) == pytest.approx(0.5) and float(rho) == pytest.approx(0.5)
    rho, fraction = noise_shrinkage(torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), w)
    assert (float(rho), float(fraction)) == (0.0, 0.0)  # no spread: nothing to correct


def test_the_combination_serves_a_diagonal_adam_metric_too():
    """FOP-AdamW: identity basis, h = sqrt(lerp(v, sum_k w_k g_k^2, 1 - beta2)) + eps from Adam's v.
    Agreeing streams give the shared component and eta = 1; conflicting ones the K = 2 closed form."""
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(3, 1, 20, generator=gen, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    v = torch.rand(3, 20, generator=gen, dtype=torch.float64)
    for streams, agree in ((torch.cat([g, g], 1), True), (torch.cat([g, -g + 0.3 * torch.randn_like(g)], 1), False)):
        second_moment = (streams.square() * weights.view(1, 2, 1)).sum(1)
        h = v.lerp(second_moment, 0.05).sqrt() + 1e-8
        combination = combine_block(streams, second_moment, fop_system(*stream_grams(streams, h), weights, 0.0),
                                    beta_max=1e9, eta_range=(1e-9, 1e9))
        if agree:
            assert torch.equal(combination.momentum, g[:, 0]) and torch.equal(combination.eta, torch.ones(3, dtype=torch.float64))
            continue
        for b in range(3):
            _, _, beta, expected = _closed_form_two_streams(streams[b, 0], streams[b, 1], h[b], 0.5)
            torch.testing.assert_close(combination.momentum[b], expected, rtol=1e-10, atol=1e-12)
