r"""SOAP's math on one block, as plain functions over tensors.

SOAP (Vyas et al., 2024, arXiv:2409.11321) runs Adam in the eigenbasis of Shampoo's
Kronecker factors. For one block with gradient :math:`G` and bases :math:`Q_i`:

.. math::
    \begin{aligned}
    g' &= \operatorname{rot}(G)                                        \\
    M  &\leftarrow \beta_1 M + (1-\beta_1)\, g'                       && \text{(kept in the eigenbasis)} \\
    V  &\leftarrow \beta_2 V + (1-\beta_2)\, g'^2                      \\
    \theta &\leftarrow \theta - \alpha_t\,
           \operatorname{unrot}\!\big(M / (\sqrt{V} + \epsilon)\big),
    \qquad \alpha_t = \gamma \sqrt{1-\beta_2^t} / (1-\beta_1^t)        \\
    \theta &\leftarrow \theta\,(1 - \gamma\lambda)                      && \text{(decoupled decay)}\\
    F_i &\leftarrow \beta_s F_i + (1-\beta_s)\, G_{(i)} G_{(i)}^\top    \\
    \end{aligned}

and every ``precondition_frequency`` steps each basis is refreshed by one power-iteration
step: with :math:`\hat\lambda = \operatorname{diag}(Q_i^\top F_i Q_i)` sorted in descending
order by a permutation :math:`\pi`, :math:`Q_i \leftarrow \operatorname{qr}(F_i Q_i[:, \pi])`,
:math:`V` is re-indexed by :math:`\pi` along dimension :math:`i` (not rotated: the paper's
approximation) and :math:`M` is carried exactly into the new basis,
:math:`M \leftarrow \operatorname{rot}_{new}(\operatorname{unrot}_{old}(M))`.

The first basis is the eigenvector matrix of the first statistics (``eigh``), columns in
descending eigenvalue order. ML-FOP-SOAP calls the same functions with the statistics taken
from several gradient streams and a combined gradient in place of :math:`g'`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mlfop.functional.rotation import rotate, unrotate

__all__ = [
    "first_eigenbasis",
    "power_iteration_basis",
    "ema_factors_",
    "adam_moments_",
    "preconditioned_direction",
    "bias_corrected_step_size",
    "apply_update_",
    "refresh_bases_",
    "soap_block_update_",
]


def _with_float64_retry(decompose: Callable[[Tensor], Tensor], matrix: Tensor) -> Tensor | None:
    """Run ``decompose`` in the matrix' dtype, retry in float64; ``None`` if both fail.

    A decomposition fails when it raises or returns non-finite values.
    """
    dtypes = [matrix.dtype] if matrix.dtype == torch.float64 else [matrix.dtype, torch.float64]
    for dtype in dtypes:
        try:
            result = decompose(matrix.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if bool(torch.isfinite(result).all()):
            return result.to(matrix.dtype)
    return None


def first_eigenbasis(factor: Tensor) -> Tensor | None:
    """Eigenvectors of the symmetric ``factor``, columns by descending eigenvalue.

    ``None`` when ``eigh`` fails in the factor's dtype and in float64.
    """
    return _with_float64_retry(lambda m: torch.linalg.eigh(m).eigenvectors.flip(-1), factor)


def power_iteration_basis(factor: Tensor, basis: Tensor) -> tuple[Tensor | None, Tensor]:
    r"""One power-iteration step from ``basis``: returns ``(new_basis, order)``.

    ``order`` sorts the columns by the estimated eigenvalues
    :math:`\operatorname{diag}(Q^\top F Q)`, descending; ``new_basis`` is
    :math:`\operatorname{qr}(F Q[:, \text{order}])`, or ``None`` if QR fails in the factor's
    dtype and in float64.
    """
    product = factor @ basis
    estimated_eigenvalues = (basis * product).sum(dim=0)
    order = torch.argsort(estimated_eigenvalues, descending=True)
    ordered = product.index_select(1, order)
    return _with_float64_retry(lambda m: torch.linalg.qr(m).Q, ordered), order


def ema_factors_(
    factors: Sequence[Tensor | None], statistics: Sequence[Tensor | None], beta: float
) -> None:
    r""":math:`F_i \leftarrow \beta F_i + (1-\beta) S_i` in place, for every rotated dimension."""
    for factor, stat in zip(factors, statistics):
        if factor is not None:
            factor.lerp_(stat, 1.0 - beta)


def adam_moments_(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    momentum_input: Tensor,
    second_moment_input: Tensor,
    beta1: float,
    beta2: float,
) -> None:
    r""":math:`M \leftarrow \beta_1 M + (1-\beta_1) g`, :math:`V \leftarrow \beta_2 V + (1-\beta_2) s`.

    For SOAP :math:`g = \operatorname{rot}(G)` and :math:`s = g^2`; ML-FOP-SOAP passes the
    combined stream gradient and the stream-weighted squares.
    """
    exp_avg.lerp_(momentum_input, 1.0 - beta1)
    exp_avg_sq.lerp_(second_moment_input, 1.0 - beta2)


def preconditioned_direction(exp_avg: Tensor, exp_avg_sq: Tensor, eps: float) -> Tensor:
    r""":math:`M / (\sqrt{V} + \epsilon)`, in the eigenbasis."""
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def bias_corrected_step_size(
    lr: float, beta1: float, beta2: float, step: int, correct_bias: bool
) -> float:
    r""":math:`\gamma\sqrt{1-\beta_2^t}/(1-\beta_1^t)` with ``correct_bias``, else :math:`\gamma`."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def apply_update_(
    param: Tensor,
    update: Tensor,
    *,
    step_size: float,
    lr: float,
    weight_decay: float,
    normalize: bool,
    scale: float | Tensor = 1.0,
) -> None:
    r""":math:`\theta \leftarrow (\theta - \alpha_t\, c\, u)(1 - \gamma\lambda)`.

    With ``normalize`` the update is first divided by its RMS; ``c = scale`` then multiplies
    it (a Python number or a 0-d tensor). ``update`` may be of a wider dtype than ``param``
    (fp32 statistics for a bf16 parameter).
    """
    if normalize:
        update = update / update.square().mean().sqrt().add_(1e-30)
    if isinstance(scale, Tensor) or scale != 1.0:
        update = update * scale
    param.add_(update.reshape(param.shape), alpha=-step_size)
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)


def refresh_bases_(
    factors: Sequence[Tensor | None],
    bases: Sequence[Tensor | None],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
) -> int:
    """Refresh every basis in place by one power-iteration step; return how many failed.

    ``exp_avg_sq`` is re-indexed along each refreshed dimension so that every entry stays with
    its direction; ``exp_avg`` is carried exactly into the new bases. A dimension whose QR
    fails (also in float64) keeps its previous basis and order.
    """
    momentum = unrotate(exp_avg, bases)
    failures = 0
    for dim, (factor, basis) in enumerate(zip(factors, bases)):
        if basis is None:
            continue
        new_basis, order = power_iteration_basis(factor, basis)
        if new_basis is None:
            failures += 1
            continue
        exp_avg_sq.copy_(exp_avg_sq.index_select(dim, order))
        basis.copy_(new_basis)
    exp_avg.copy_(rotate(momentum, bases))
    return failures


def soap_block_update_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    factors: Sequence[Tensor | None],
    bases: Sequence[Tensor | None],
    *,
    momentum_input: Tensor,
    second_moment_input: Tensor,
    factor_statistics: Sequence[Tensor | None],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    factor_beta: float,
    eps: float,
    weight_decay: float,
    precondition_frequency: int,
    correct_bias: bool,
    normalize_grads: bool,
    update_scale: float | Tensor = 1.0,
) -> int:
    """One real SOAP step of a block (``step`` = t >= 1); returns the number of failed refreshes.

    The moments, factors and bases are block-shaped and updated in place; the basis refreshed
    at ``t % precondition_frequency == 0`` is first used at the next step, so a gradient never
    shapes its own projection. ``update_scale`` multiplies the update (ML-FOP-SOAP's step
    scale; 1 for SOAP).
    """
    adam_moments_(exp_avg, exp_avg_sq, momentum_input, second_moment_input, beta1, beta2)
    update = unrotate(preconditioned_direction(exp_avg, exp_avg_sq, eps), bases)
    apply_update_(
        param,
        update,
        step_size=bias_corrected_step_size(lr, beta1, beta2, step, correct_bias),
        lr=lr,
        weight_decay=weight_decay,
        normalize=normalize_grads,
        scale=update_scale,
    )
    ema_factors_(factors, factor_statistics, factor_beta)
    if step % precondition_frequency == 0:
        return refresh_bases_(factors, bases, exp_avg, exp_avg_sq)
    return 0
