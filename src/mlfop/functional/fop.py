r"""The Fisher-orthogonal combination of K >= 2 gradient streams, on one block.

Inputs are the stream gradients already rotated into SOAP's eigenbasis, stacked as
:math:`R = [r_1; \dots; r_K]`, the diagonal curvature :math:`h = \sqrt{V_t} + \epsilon` (the
denominator of this step's SOAP update) and stream weights :math:`w` (:math:`\sum_k w_k = 1`).
With :math:`\langle a, b\rangle_H = \sum a\,b\,h` and :math:`\langle a, b\rangle_{H^{-1}} = \sum a\,b/h`:

.. math::
    \begin{aligned}
    \bar g &= \textstyle\sum_k w_k r_k
        && \text{shared component} \\
    s_k &= \langle r_k - \bar g, \bar g\rangle_H / (\langle \bar g, \bar g\rangle_H + \epsilon_{fop}), \quad
    g^\perp_k = (r_k - \bar g) - s_k \bar g
        && \langle g^\perp_k, \bar g\rangle_H = 0 \\
    D_k &= \langle \bar g, g^\perp_k\rangle_{H^{-1}}, \quad E_{jk} = \langle g^\perp_j, g^\perp_k\rangle_{H^{-1}} \\
    \beta &= \operatorname{clip}_{[-\beta_{max}, \beta_{max}]}\big(E^{+} D\big), \quad
    g_{comb} = \bar g + \textstyle\sum_k \beta_k g^\perp_k \\
    \eta^* &= \operatorname{clip}_{[\eta_{min}, \eta_{max}]}
        \big(\langle \bar g, g_{comb}\rangle_{H^{-1}} / \langle g_{comb}, g_{comb}\rangle_{H^{-1}}\big)
    \end{aligned}

:math:`\beta` minimises FOP's second-order model of what the correction adds to a natural-gradient
step, :math:`f(\beta) = -\beta^\top D + \tfrac12 \beta^\top E \beta` (the gain of the correction's
alignment with the shared component against its own curvature cost); :math:`\eta^*` is the
step length that minimises the same model along :math:`g_{comb}`.

Every vector here is a linear combination of the streams, so the whole computation reduces to
two :math:`K \times K` Gram matrices, :math:`G_H = R\,\mathrm{diag}(h) R^\top` and
:math:`G_{H^{-1}} = R\,\mathrm{diag}(1/h) R^\top`, and small float64 algebra on coefficient vectors:
one pass over the block per metric, and one more to form :math:`g_{comb} = c^\top R`.

:math:`E` is singular by construction (:math:`\sum_k w_k g^\perp_k = 0`); in coefficient space that
null vector is exact to float64 rounding, and :math:`E^{+}` cuts eigenvalues below
``rcond`` times the largest. Of the solutions, we take the one whose components sum to zero (it
differs from the minimum-norm one by a multiple of :math:`w`, which leaves :math:`g_{comb}`
unchanged); for K = 2 it is :math:`\beta = (b, -b)` with :math:`b` FOP's closed form
:math:`\beta^* = D/E` on :math:`g_1 - g_2`, whatever the weights, so clipping the components is
clipping :math:`\beta^*`. The result is equivariant under any renaming or reordering of the streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FOPSystem",
    "stream_gram_matrices",
    "fop_system",
    "solve_beta",
    "combination_coefficients",
    "step_scale",
    "combine",
    "euclidean_gram",
    "stream_noise",
    "noise_shrinkage",
]


@dataclass(frozen=True)
class FOPSystem:
    """One block's FOP quantities in coefficient space (float64, on the CPU).

    ``perp[:, k]`` are the coefficients of :math:`g^\\perp_k` over the streams, ``s`` the
    projections, ``d`` and ``e`` the right-hand side and matrix of the beta solve; ``spread``
    and ``spread_reference`` say whether the perpendicular parts are float32 rounding (see
    :func:`solve_beta`).
    """

    weights: Tensor
    gram_hinv: Tensor
    perp: Tensor
    s: Tensor
    d: Tensor
    e: Tensor
    spread: Tensor
    spread_reference: float


def stream_gram_matrices(rotated: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(G_H, G_Hinv)``: K x K Gram matrices of the K stacked rotated streams (float64, CPU)."""
    flat = rotated.reshape(rotated.shape[0], -1)
    h = h.reshape(1, -1)
    gram_h = (flat * h) @ flat.T
    gram_hinv = (flat / h) @ flat.T
    return gram_h.double().cpu(), gram_hinv.double().cpu()


def fop_system(
    gram_h: Tensor, gram_hinv: Tensor, weights: Tensor, eps_fop: float, gram_e: Tensor | None = None
) -> FOPSystem:
    """Project each stream's deviation H-orthogonally to the shared component; build ``D``, ``E``.

    With the Euclidean Gram ``gram_e`` the perpendicular parts are also measured in the plain
    metric (``spread``), where float32 rounding is relative to the shared component; without it,
    under :math:`H^{-1}`, which amplifies rounding in eigen-directions where the shared
    component is small.
    """
    weights = weights.to(torch.float64)
    k = weights.numel()
    deviation = torch.eye(k, dtype=torch.float64) - weights[:, None]  # column k: e_k - w
    denominator = float(weights @ gram_h @ weights) + eps_fop
    projection = deviation.T @ gram_h @ weights
    s = projection / denominator if denominator > 0.0 else torch.zeros_like(projection)
    perp = deviation - weights[:, None] * s[None, :]
    d = perp.T @ gram_hinv @ weights
    e = perp.T @ gram_hinv @ perp
    metric = gram_hinv if gram_e is None else gram_e.to(torch.float64)
    return FOPSystem(weights=weights, gram_hinv=gram_hinv, perp=perp, s=s, d=d, e=e,
                     spread=perp.T @ metric @ perp, spread_reference=float(weights @ metric @ weights))


def solve_beta(
    d: Tensor,
    e: Tensor,
    weights: Tensor,
    beta_max: float,
    spread: Tensor | None = None,
    reference: float = 0.0,
    rcond: float = 1e-5,
) -> Tensor:
    r"""Zero-sum solution of ``E beta = D`` (pseudo-inverse with relative cut ``rcond``), clipped.

    Returns zeros when the perpendicular parts are negligible: the largest eigenvalue of
    ``spread`` (their Gram matrix, :attr:`FOPSystem.spread`; ``E`` if not given) at most
    ``1e-10 * reference`` (the shared component's squared length in the same metric).
    Perpendicular parts below 1e-5 of the shared component's length are float32 rounding of
    streams that agree, whose ratio D/E would be noise.
    """
    e = 0.5 * (e + e.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(e)
    largest = float(eigenvalues.abs().max())
    largest_spread = largest if spread is None else float(torch.linalg.eigvalsh(0.5 * (spread + spread.T)).abs().max())
    if largest_spread <= 1e-10 * reference or largest <= 0.0 or not torch.isfinite(eigenvalues).all():
        return torch.zeros_like(d)
    keep = eigenvalues > rcond * largest
    coords = (eigenvectors.T @ d)[keep] / eigenvalues[keep]
    beta = eigenvectors[:, keep] @ coords
    beta = beta - beta.sum() * weights.to(torch.float64)  # same g_comb (E w = 0), components sum to 0
    return beta.clamp(-beta_max, beta_max)


def combination_coefficients(system: FOPSystem, beta: Tensor) -> Tensor:
    r"""``c`` with :math:`g_{comb} = \sum_k c_k r_k = \bar g + \sum_k \beta_k g^\perp_k`."""
    return system.weights + system.perp @ beta


def step_scale(system: FOPSystem, coefficients: Tensor, eta_range: tuple[float, float]) -> float:
    r""":math:`\eta^*` for ``g_comb = c^T R``, clipped to ``eta_range``; 1 when ``g_comb`` vanishes."""
    comb_norm = float(coefficients @ system.gram_hinv @ coefficients)
    if comb_norm <= 0.0:
        return 1.0
    eta = float(system.weights @ system.gram_hinv @ coefficients) / comb_norm
    return min(max(eta, eta_range[0]), eta_range[1])


def combine(rotated: Tensor, coefficients: Tensor) -> Tensor:
    """:math:`\\sum_k c_k r_k` over the leading (stream) dimension."""
    return torch.tensordot(coefficients.to(device=rotated.device, dtype=rotated.dtype), rotated, dims=1)


def euclidean_gram(rotated: Tensor) -> Tensor:
    """``R R^T``: plain inner products of the K stacked streams (float64, CPU).

    Rotations are orthogonal, so these equal the inner products in the original basis.
    """
    flat = rotated.reshape(rotated.shape[0], -1)
    return (flat @ flat.T).double().cpu()


def stream_noise(
    micro_sq: Tensor, sums_sq: Tensor, micro_batches: Tensor, norm_counts: Tensor, shares: Tensor, scale: float
) -> Tensor:
    r"""Sampling variance :math:`\sigma_k^2 = \operatorname{tr}\operatorname{Var}(g_k)` per stream (and group).

    From level-0 scalars: stream :math:`k` folded :math:`n_k` micro-gradients :math:`m_i` into
    :math:`S_k = \sum_i m_i`, and the squared norms of :math:`n'_k \le n_k` of them sum to
    ``micro_sq`` (under DDP the synced micro-batch is not a sample and is left out). With
    :math:`\mathbb{E}\lVert m\rVert^2 = \operatorname{Var}(m) + \lVert\mu\rVert^2` and
    :math:`\mathbb{E}\lVert S_k/n_k\rVert^2 = \lVert\mu\rVert^2 + \operatorname{Var}(m)/n_k`:

    .. math::
        \widehat{\operatorname{Var}}(m) = \frac{n_k}{n_k - 1}
            \Big(\frac{\sum_i \lVert m_i\rVert^2}{n'_k} - \frac{\lVert S_k\rVert^2}{n_k^2}\Big),
        \qquad \sigma_k^2 = (c / a_k)^2\, n_k\, \widehat{\operatorname{Var}}(m)

    for :math:`g_k = c\, S_k / a_k`. ``micro_sq`` and ``sums_sq`` have shape (K, G) (G groups:
    heads, or 1); a stream without two micro-batches and one measured norm has no estimate (0).
    """
    n = micro_batches.to(torch.float64).view(-1, 1)
    measured = norm_counts.to(torch.float64).view(-1, 1)
    mean_sq = micro_sq / measured.clamp_min(1.0) - sums_sq / (n * n).clamp_min(1.0)
    spread = mean_sq.clamp_min(0.0) * n / (n - 1.0).clamp_min(1.0)
    sigma_sq = (scale / shares.to(torch.float64).view(-1, 1)) ** 2 * n * spread
    valid = (n >= 2) & (measured >= 1)
    return torch.where(valid, sigma_sq, torch.zeros_like(sigma_sq))


def noise_shrinkage(sigma_sq: Tensor, gram_e: Tensor, weights: Tensor) -> tuple[float, float]:
    r"""``(rho, noise_fraction)``: the factor that fades a correction made of sampling noise.

    With independent noise of variance :math:`\sigma_k^2` on each stream,
    :math:`\mathbb{E} \sum_k w_k \lVert g_k - \bar g\rVert^2 = \text{signal} + \sum_k w_k (1 - w_k) \sigma_k^2`,
    so the noise fraction of the observed spread is
    :math:`\nu = \sum_k w_k(1-w_k)\sigma_k^2 / \sum_k w_k \lVert g_k - \bar g\rVert^2` and
    :math:`\rho = \max(0, 1 - \nu)`. For K = 2 and equal weights this is
    :math:`(\sigma_1^2 + \sigma_2^2) / \lVert g_1 - g_2\rVert^2`. No spread at all gives
    :math:`\rho = 0` (nothing to correct).
    """
    weights = weights.to(torch.float64)
    spread = float(weights @ torch.diagonal(gram_e) - weights @ gram_e @ weights)
    noise = float((weights * (1.0 - weights) * sigma_sq).sum())
    if spread <= 0.0:
        return 0.0, 1.0 if noise > 0.0 else 0.0
    fraction = noise / spread
    return max(0.0, 1.0 - fraction), fraction

