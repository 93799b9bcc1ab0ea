r"""The Fisher-orthogonal combination of K >= 2 gradient streams, for a batch of blocks.

Inputs are the stream gradients in the metric's basis, stacked as
:math:`R = [r_1; \dots; r_K]`, a diagonal metric :math:`h` in that basis and stream weights
:math:`w` (:math:`\sum_k w_k = 1`). With :math:`\langle a, b\rangle_H = \sum a\,b\,h` and
:math:`\langle a, b\rangle_{H^{-1}} = \sum a\,b/h`:

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
:math:`K \times K` Gram matrices, :math:`G_H = R\,\mathrm{diag}(h) R^\top` and
:math:`G_{H^{-1}} = R\,\mathrm{diag}(1/h) R^\top` (and the plain :math:`G_E = R R^\top`), and
small float64 algebra on coefficient vectors, on the streams' device: one pass over the block
per metric, and one more to form :math:`g_{comb} = c^\top R`.

:math:`E` is singular by construction (:math:`\sum_k w_k g^\perp_k = 0`, exactly in coefficient
space). We take the solution whose components sum to zero: :math:`\beta = U y` with :math:`U`
an orthonormal basis of the zero-sum vectors and :math:`y = (U^\top E U)^{+} U^\top D`, the
pseudo-inverse cutting eigenvalues below ``rcond`` times the largest. It differs from the
minimum-norm solution by a multiple of :math:`w`, which leaves :math:`g_{comb}` unchanged; for
K = 2 it is :math:`\beta = (b, -b)` with :math:`b` FOP's closed form :math:`\beta^* = D/E` on
:math:`g_1 - g_2`, whatever the weights, so clipping the components is clipping
:math:`\beta^*`. The result is equivariant under any renaming or reordering of the streams.

Everything accepts leading batch dimensions (a batch of blocks, or blocks x heads): Gram
matrices ``(..., K, K)``, vectors ``(..., K)``. No function reads a value back to the host:
each data-dependent case (a negligible spread, a vanishing :math:`g_{comb}`) is a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FOPSystem",
    "Combination",
    "stream_grams",
    "fop_system",
    "symmetric_eigh",
    "solve_beta",
    "combination_coefficients",
    "step_scale",
    "gram_step_scale",
    "combine",
    "stream_noise",
    "noise_shrinkage",
    "combine_block",
    "SystemTotals",
    "conflicts",
    "global_beta",
]

# Perpendicular parts whose squared length is below this fraction of the shared component's
# are float32 rounding of streams that agree, whose ratio D/E would be noise.
_NEGLIGIBLE_SPREAD = 1e-10


@dataclass(frozen=True)
class FOPSystem:
    """The FOP quantities of a batch of blocks in coefficient space (float64, streams' device).

    ``perp[..., :, k]`` are the coefficients of :math:`g^\\perp_k` over the streams, ``s`` the
    projections, ``d`` and ``e`` the right-hand side and matrix of the beta solve. ``spread``
    is the perpendicular parts' Gram matrix and ``spread_reference`` the shared component's
    squared length, both in the plain metric, where float32 rounding is relative to the shared
    component (under :math:`H^{-1}` it is amplified in eigen-directions where the shared
    component is small).
    """

    weights: Tensor
    gram_e: Tensor
    gram_h: Tensor
    gram_hinv: Tensor
    perp: Tensor
    s: Tensor
    d: Tensor
    e: Tensor
    spread: Tensor
    spread_reference: Tensor


@dataclass(frozen=True)
class Combination:
    """What the correction hands the base optimizer for a batch of blocks.

    ``momentum`` :math:`g_{comb}` and ``second_moment`` (the base's second-moment input,
    :math:`\\max(W \\sum_k w_k r_k^2, g_{comb}^2)`) have the streams' trailing shape; ``eta``
    :math:`\\eta^*` is ``(...,)``; ``beta_raw``/``beta`` (before/after the noise shrinkage),
    ``noise_fraction``, the ``coefficients`` :math:`c` of the streams and the ``system`` describe
    the correction (per head for the head level).
    """

    momentum: Tensor
    second_moment: Tensor
    eta: Tensor
    beta_raw: Tensor
    beta: Tensor
    noise_fraction: Tensor | None
    system: FOPSystem
    coefficients: Tensor


def stream_grams(flat: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(G_E, G_H, G_Hinv)`` ``(..., K, K)`` in float64 of the streams ``flat`` ``(..., K, N)``
    under a diagonal metric ``h`` ``(..., N)``.

    The streams are divided by their largest magnitude before the products and the result
    multiplied back in float64, so that no float32 product overflows (:math:`r^2 h` would for
    gradients of about :math:`10^{12}`).
    """
    scale = flat.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    unit = flat / scale
    h = h.unsqueeze(-2)
    factor = scale.double().square()
    grams = (unit @ unit.mT, (unit * h) @ unit.mT, (unit / h) @ unit.mT)
    return tuple(gram.double() * factor for gram in grams)


def fop_system(gram_e: Tensor, gram_h: Tensor, gram_hinv: Tensor, weights: Tensor, eps_fop: float) -> FOPSystem:
    """Project each stream's deviation H-orthogonally to the shared component; build ``D``, ``E``."""
    w = weights.to(dtype=torch.float64, device=gram_h.device)
    k = w.numel()
    deviation = torch.eye(k, dtype=torch.float64, device=w.device) - w[:, None]  # column k: e_k - w
    gram_h_w = gram_h @ w
    denominator = (gram_h_w * w).sum(-1) + eps_fop
    projection = gram_h_w @ deviation
    s = torch.where(denominator[..., None] > 0, projection / denominator[..., None], torch.zeros_like(projection))
    perp = deviation - w[:, None] * s[..., None, :]
    d = ((gram_hinv @ w)[..., None, :] @ perp).squeeze(-2)
    return FOPSystem(
        weights=w, gram_e=gram_e, gram_h=gram_h, gram_hinv=gram_hinv, perp=perp, s=s, d=d,
        e=perp.mT @ gram_hinv @ perp, spread=perp.mT @ gram_e @ perp, spread_reference=(gram_e @ w * w).sum(-1),
    )


def symmetric_eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of small symmetric matrices ``(..., n, n)`` by cyclic Jacobi
    rotations: batched tensor operations only, so no host synchronisation (``torch.linalg.eigh``
    synchronises on CUDA). Exact after one rotation for n = 2; six sweeps for larger n, whose
    convergence is quadratic."""
    n = matrices.shape[-1]
    eye = torch.eye(n, dtype=matrices.dtype, device=matrices.device)
    vectors = eye.expand(matrices.shape).clone()
    a = matrices
    for _ in range(1 if n <= 2 else 6):
        for p in range(n - 1):
            for q in range(p + 1, n):
                theta = 0.5 * torch.atan2(2.0 * a[..., p, q], a[..., q, q] - a[..., p, p])
                cos, sin = torch.cos(theta), torch.sin(theta)
                rotation = eye.expand(matrices.shape).clone()
                rotation[..., p, p] = cos
                rotation[..., q, q] = cos
                rotation[..., p, q] = sin
                rotation[..., q, p] = -sin
                a = rotation.mT @ a @ rotation
                vectors = vectors @ rotation
    return torch.diagonal(a, dim1=-2, dim2=-1), vectors


def _zero_sum_basis(k: int, device: torch.device) -> Tensor:
    """``(K, K-1)``: an orthonormal basis of the vectors whose components sum to zero (Helmert's:
    column j has j ones, then -j, divided by sqrt(j (j + 1)))."""
    rows = torch.arange(k, device=device).view(-1, 1)
    cols = torch.arange(1, k, device=device, dtype=torch.float64).view(1, -1)
    entries = torch.where(rows < cols, 1.0, torch.where(rows == cols, -cols, 0.0))
    return entries / (cols * (cols + 1.0)).sqrt()


def solve_beta(
    d: Tensor, e: Tensor, spread: Tensor, spread_reference: Tensor, beta_max: float, rcond: float = 1e-5
) -> Tensor:
    r"""The zero-sum solution of ``E beta = D`` (pseudo-inverse with relative cut ``rcond``),
    clipped to :math:`[-\beta_{max}, \beta_{max}]`; ``(..., K)``.

    Zero where the perpendicular parts are negligible: their total squared length
    (``trace(spread)``, :attr:`FOPSystem.spread`) at most ``1e-10`` times the shared
    component's (``spread_reference``), or where :math:`E` vanishes or is not finite.
    """
    k = d.shape[-1]
    basis = _zero_sum_basis(k, d.device)
    reduced = basis.T @ e @ basis
    reduced = 0.5 * (reduced + reduced.mT)
    eigenvalues, eigenvectors = symmetric_eigh(reduced)
    largest = eigenvalues.abs().amax(-1, keepdim=True)
    keep = eigenvalues > rcond * largest
    coords = (d @ basis)[..., None, :] @ eigenvectors
    coords = torch.where(keep, coords.squeeze(-2) / torch.where(keep, eigenvalues, 1.0), 0.0)
    beta = ((eigenvectors @ coords[..., None]).squeeze(-1) @ basis.T).clamp(-beta_max, beta_max)
    spread = torch.diagonal(spread, dim1=-2, dim2=-1).sum(-1)
    negligible = (
        (spread <= _NEGLIGIBLE_SPREAD * spread_reference)
        | (largest.squeeze(-1) <= 0.0)
        | ~torch.isfinite(eigenvalues).all(-1)
    )
    return torch.where(negligible[..., None], 0.0, beta)


def combination_coefficients(system: FOPSystem, beta: Tensor) -> Tensor:
    r"""``c`` with :math:`g_{comb} = \sum_k c_k r_k = \bar g + \sum_k \beta_k g^\perp_k`; exactly
    :math:`w` where :math:`\beta = 0`."""
    coefficients = system.weights + (system.perp @ beta[..., None]).squeeze(-1)
    return torch.where((beta == 0).all(-1, keepdim=True), system.weights, coefficients)


def step_scale(shared_dot_comb: Tensor, comb_norm_sq: Tensor, eta_range: tuple[float, float]) -> Tensor:
    r""":math:`\eta^* = \langle \bar g, g_{comb}\rangle_{H^{-1}} / \langle g_{comb}, g_{comb}\rangle_{H^{-1}}`,
    clipped to ``eta_range``; 1 where :math:`g_{comb}` vanishes."""
    ratio = shared_dot_comb / torch.where(comb_norm_sq > 0, comb_norm_sq, 1.0)
    return torch.where(comb_norm_sq > 0, ratio.clamp(*eta_range), 1.0)


def gram_step_scale(system: FOPSystem, coefficients: Tensor, eta_range: tuple[float, float]) -> Tensor:
    """:func:`step_scale` of ``g_comb = c^T R`` from the Gram matrix; exactly 1 where ``c = w``."""
    gram_c = (system.gram_hinv @ coefficients[..., None]).squeeze(-1)
    eta = step_scale((system.weights * gram_c).sum(-1), (coefficients * gram_c).sum(-1), eta_range)
    return torch.where((coefficients == system.weights).all(-1), 1.0, eta)


def combine(flat: Tensor, coefficients: Tensor) -> Tensor:
    r""":math:`\sum_k c_k r_k` over the stream axis: ``flat`` ``(..., K, N)``, ``c`` ``(..., K)``."""
    return (coefficients.to(flat.dtype)[..., None, :] @ flat).squeeze(-2)


def stream_noise(
    micro_sq: Tensor, sums_sq: Tensor, micro_batches: Tensor, norm_counts: Tensor, shares: Tensor, scale: Tensor | float
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

    for :math:`g_k = c\, S_k / a_k`. ``micro_sq`` and ``sums_sq`` are ``(..., K, G)`` (G groups:
    heads, or 1), the counts and shares ``(K,)``; a stream without two micro-batches and one
    measured norm has no estimate (0).
    """
    device = micro_sq.device
    n = micro_batches.to(dtype=torch.float64, device=device).view(-1, 1)
    measured = norm_counts.to(dtype=torch.float64, device=device).view(-1, 1)
    mean_sq = micro_sq / measured.clamp_min(1.0) - sums_sq / (n * n).clamp_min(1.0)
    spread = mean_sq.clamp_min(0.0) * n / (n - 1.0).clamp_min(1.0)
    coefficient = torch.as_tensor(scale, dtype=torch.float64, device=device) / shares.to(dtype=torch.float64, device=device).view(-1, 1)
    sigma_sq = coefficient.square() * n * spread
    return torch.where((n >= 2) & (measured >= 1), sigma_sq, 0.0)


def noise_shrinkage(sigma_sq: Tensor, gram_e: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(rho, noise_fraction)`` ``(...)``: the factor that fades a correction made of sampling noise.

    With independent noise of variance :math:`\sigma_k^2` on each stream,
    :math:`\mathbb{E} \sum_k w_k \lVert g_k - \bar g\rVert^2 = \text{signal} + \sum_k w_k (1 - w_k) \sigma_k^2`,
    so the noise fraction of the observed spread is
    :math:`\nu = \sum_k w_k(1-w_k)\sigma_k^2 / \sum_k w_k \lVert g_k - \bar g\rVert^2` and
    :math:`\rho = \max(0, 1 - \nu)`. For K = 2 and equal weights this is
    :math:`(\sigma_1^2 + \sigma_2^2) / \lVert g_1 - g_2\rVert^2`. No spread at all gives
    :math:`\rho = 0` (nothing to correct). ``sigma_sq`` is ``(..., K)``, ``gram_e`` ``(..., K, K)``.
    """
    w = weights.to(dtype=torch.float64, device=gram_e.device)
    spread = (torch.diagonal(gram_e, dim1=-2, dim2=-1) * w).sum(-1) - (gram_e @ w * w).sum(-1)
    noise = (w * (1.0 - w) * sigma_sq).sum(-1)
    positive = spread > 0
    fraction = torch.where(positive, noise / torch.where(positive, spread, 1.0), (noise > 0).to(noise.dtype))
    rho = torch.where(positive, (1.0 - fraction).clamp_min(0.0), 0.0)
    return rho, fraction


def combine_block(
    flat: Tensor,
    second_moment: Tensor,
    system: FOPSystem,
    *,
    beta_max: float,
    eta_range: tuple[float, float],
    beta: Tensor | None = None,
    sigma_sq: Tensor | None = None,
) -> Combination:
    r"""The Fisher-orthogonal combination of each block's streams ``flat`` ``(..., K, N)``.

    ``second_moment`` :math:`W \sum_k w_k r_k^2` ``(..., N)`` and ``system`` (under the metric
    that produced it) come from the caller; ``beta`` fixes :math:`\beta` (the global level's
    :math:`\beta_G`), else each block solves its own, shrunk by the noise estimate ``sigma_sq``
    ``(..., K)`` when given. A diagonal metric of any base fits: SOAP's eigenbasis
    denominator, or Adam's :math:`\sqrt{v} + \epsilon` in the identity basis.
    """
    noise_fraction = None
    if beta is None:
        beta_raw = beta = solve_beta(system.d, system.e, system.spread, system.spread_reference, beta_max)
        if sigma_sq is not None:
            rho, noise_fraction = noise_shrinkage(sigma_sq, system.gram_e, system.weights)
            beta = beta_raw * rho[..., None]
    else:
        beta = beta_raw = beta.expand(system.d.shape)
    coefficients = combination_coefficients(system, beta)
    momentum = combine(flat, coefficients)
    return Combination(
        momentum=momentum,
        second_moment=torch.maximum(second_moment, momentum.square()),
        eta=gram_step_scale(system, coefficients, eta_range),
        beta_raw=beta_raw,
        beta=beta,
        noise_fraction=noise_fraction,
        system=system,
        coefficients=coefficients,
    )


@dataclass
class SystemTotals:
    """Sums over a step's blocks of what the global level and the diagnostics need (float64)."""

    d: Tensor
    e: Tensor
    spread: Tensor
    spread_reference: Tensor
    gram_e: Tensor
    gram_h: Tensor
    norms_hinv_sq: Tensor
    sigma_sq: Tensor
    blocks: Tensor
    conflicting: Tensor

    @classmethod
    def zeros(cls, k: int, device: torch.device) -> SystemTotals:
        def zero(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(zero(k), zero(k, k), zero(k, k), zero(), zero(k, k), zero(k, k), zero(k), zero(k), zero(), zero())

    def add(self, system: FOPSystem, sigma_sq: Tensor | None = None) -> None:
        """Add a batch of blocks (``sigma_sq`` ``(B, K)``, its noise estimate, if any)."""
        batch = system.d.shape[0]
        self.d += system.d.sum(0)
        self.e += system.e.sum(0)
        self.spread += system.spread.sum(0)
        self.spread_reference += system.spread_reference.sum(0)
        self.gram_e += system.gram_e.sum(0)
        self.gram_h += system.gram_h.sum(0)
        self.norms_hinv_sq += torch.diagonal(system.gram_hinv, dim1=-2, dim2=-1).sum(0)
        if sigma_sq is not None:
            self.sigma_sq += sigma_sq.sum(0)
        self.blocks += batch
        self.conflicting += conflicts(system.gram_e).sum()


def conflicts(gram_e: Tensor) -> Tensor:
    """``(...)``: whether some pair of streams points apart (a negative inner product)."""
    off_diagonal = gram_e - torch.diag_embed(torch.diagonal(gram_e, dim1=-2, dim2=-1))
    return (off_diagonal < 0).flatten(-2).any(-1)


def global_beta(totals: SystemTotals, weights: Tensor, beta_max: float, shrink: bool) -> tuple[Tensor, Tensor]:
    r"""``(beta_raw, beta)`` ``(K,)`` of the global level: one solve of the sums of every block's
    :math:`D` and :math:`E` (and spreads), shrunk by the summed noise estimate with ``shrink``."""
    beta_raw = solve_beta(totals.d, totals.e, totals.spread, totals.spread_reference, beta_max)
    if not shrink:
        return beta_raw, beta_raw
    return beta_raw, beta_raw * noise_shrinkage(totals.sigma_sq, totals.gram_e, weights)[0]
