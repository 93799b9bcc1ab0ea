r"""SOAP's math on a batch of same-shaped blocks, as plain functions over tensors.

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
descending eigenvalue order.

Every tensor carries a leading batch axis of ``B`` blocks of one shape (``B = 1`` for a single
block): moments ``(B, *block)``, factors and bases ``(B, d_i, d_i)``. The only data-dependent
decision, whether a decomposition failed, is one host read per batch on refresh steps (and
first calls); only the failing blocks are then recomputed in float64. ML-FOP-SOAP calls
the same functions with the statistics taken from several gradient streams and a combined
gradient in place of :math:`g'`.
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
    "soap_denominator",
    "bias_corrected_step_size",
    "apply_update_",
    "refresh_bases_",
    "soap_update_",
]


def _decompose_with_retry(decompose: Callable[[Tensor], Tensor], matrices: Tensor) -> tuple[Tensor, Tensor | None, int]:
    """``decompose`` each matrix of the stack ``(..., d, d)``; failures are retried in float64.

    Returns ``(result, ok, failures)``. A decomposition fails when it raises or returns
    non-finite values; one that raises for the stack is retried matrix by matrix. ``ok`` is
    ``None`` when every matrix succeeded (the common case, known after one host read), else
    the mask of those that succeeded in their dtype or in float64; ``failures`` counts the
    others, whose ``result`` is unspecified.
    """
    raised = False
    try:
        result = decompose(matrices)
        # Orthonormal results have entries of at most 1: the sum is finite iff every entry is.
        ok = torch.isfinite(result.sum((-2, -1)))
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        raised = True
        result = torch.zeros_like(matrices)
        ok = torch.zeros(matrices.shape[:-2], dtype=torch.bool, device=matrices.device)
    if bool(ok.all()):
        return result, None, 0
    flat_result, flat_ok = result.reshape(-1, *result.shape[-2:]), ok.reshape(-1).clone()
    flat_matrices = matrices.reshape(-1, *matrices.shape[-2:])
    # One failing matrix makes the whole stack raise: then the others get a chance alone first.
    dtypes = [matrices.dtype, torch.float64] if raised and len(flat_matrices) > 1 else [torch.float64]
    dtypes = list(dict.fromkeys(dtypes))
    for index in (~flat_ok).nonzero().flatten().tolist():
        for dtype in dtypes:
            try:
                retried = decompose(flat_matrices[index].to(dtype))
            except RuntimeError:
                continue
            if bool(torch.isfinite(retried).all()):
                flat_result[index] = retried.to(matrices.dtype)
                flat_ok[index] = True
                break
    failures = int((~flat_ok).sum())
    return flat_result.view(result.shape), flat_ok.view(ok.shape), failures


def first_eigenbasis(factors: Tensor) -> tuple[Tensor, int]:
    """Eigenvectors of each symmetric factor ``(..., d, d)``, columns by descending eigenvalue.

    Returns ``(bases, failures)``: where ``eigh`` failed in the factor's dtype and in float64
    the basis is the identity.
    """
    bases, ok, failures = _decompose_with_retry(lambda m: torch.linalg.eigh(m).eigenvectors.flip(-1), factors)
    if ok is not None:
        identity = torch.eye(factors.shape[-1], dtype=factors.dtype, device=factors.device)
        bases = torch.where(ok[..., None, None], bases, identity)
    return bases, failures


def power_iteration_basis(factors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, int]:
    r"""One power-iteration step from ``bases``: returns ``(new_bases, order, failures)``.

    ``order`` ``(..., d)`` sorts each basis' columns by the estimated eigenvalues
    :math:`\operatorname{diag}(Q^\top F Q)`, descending; ``new_bases`` is
    :math:`\operatorname{qr}(F Q[:, \text{order}])`. Where QR fails in the factor's dtype and
    in float64, the basis stays as it was and ``order`` is the identity permutation.
    """
    product = factors @ bases
    estimated_eigenvalues = (bases * product).sum(dim=-2)
    order = torch.argsort(estimated_eigenvalues, dim=-1, descending=True)
    ordered = torch.gather(product, -1, order.unsqueeze(-2).expand_as(product))
    new_bases, ok, failures = _decompose_with_retry(lambda m: torch.linalg.qr(m).Q, ordered)
    if ok is not None:
        new_bases = torch.where(ok[..., None, None], new_bases, bases)
        order = torch.where(ok[..., None], order, torch.arange(order.shape[-1], device=order.device))
    return new_bases, order, failures


def ema_factors_(factors: Sequence[Tensor | None], statistics: Sequence[Tensor | None], beta: float) -> None:
    r""":math:`F_i \leftarrow \beta F_i + (1-\beta) S_i` in place, for every rotated dimension."""
    for factor, stat in zip(factors, statistics):
        if factor is not None:
            factor.lerp_(stat, 1.0 - beta)


def adam_moments_(
    exp_avg: Tensor, exp_avg_sq: Tensor, momentum_input: Tensor, second_moment_input: Tensor, beta1: float, beta2: float
) -> None:
    r""":math:`M \leftarrow \beta_1 M + (1-\beta_1) g`, :math:`V \leftarrow \beta_2 V + (1-\beta_2) s`.

    For SOAP :math:`g = \operatorname{rot}(G)` and :math:`s = g^2`; ML-FOP-SOAP passes the
    combined stream gradient and the streams' squares. The moments may be of a narrower dtype
    (bfloat16): the inputs are rounded to it.
    """
    exp_avg.lerp_(momentum_input.to(exp_avg.dtype), 1.0 - beta1)
    exp_avg_sq.lerp_(second_moment_input.to(exp_avg_sq.dtype), 1.0 - beta2)


def soap_denominator(exp_avg_sq: Tensor, second_moment_input: Tensor | None, beta2: float, eps: float) -> Tensor:
    r""":math:`\sqrt{\beta_2 V + (1-\beta_2) s} + \epsilon`: SOAP's denominator after this step's
    second moment :math:`s` (``None``: :math:`\sqrt{V} + \epsilon`, ``V`` already updated).

    The same formula gives ML-FOP-SOAP's diagonal metric :math:`h` before the moments move.
    """
    updated = exp_avg_sq if second_moment_input is None else exp_avg_sq.lerp(second_moment_input, 1.0 - beta2)
    return updated.sqrt().add_(eps)


def bias_corrected_step_size(lr: float | Tensor, beta1: float, beta2: float, step: int, correct_bias: bool) -> float | Tensor:
    r""":math:`\gamma\sqrt{1-\beta_2^t}/(1-\beta_1^t)` with ``correct_bias``, else :math:`\gamma`."""
    if not correct_bias:
        return lr
    # One multiplication of lr: a tensor lr then rounds as a Python float does.
    return lr * (math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step))


def _per_block(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` values shaped to broadcast over a ``(B, *block)`` tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


def apply_update_(
    params: Sequence[Tensor],
    update: Tensor,
    *,
    step_size: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    normalize: bool,
    scale: Tensor | None = None,
) -> None:
    r""":math:`\theta_b \leftarrow (\theta_b - \alpha_t\, c_b\, u_b)(1 - \gamma\lambda)` for each block.

    ``update`` is ``(B, *block)`` and ``params`` its ``B`` parameters (any shape of the block's
    size, one floating dtype: a bf16 parameter takes an fp32 update). With ``normalize`` each
    block's update is first divided by its RMS; ``scale`` ``(B,)`` multiplies it. The factors
    are applied before the addition (no ``alpha=``, which inductor mis-compiles).
    """
    if normalize:
        update = update / _per_block(update.square().reshape(len(update), -1).mean(1).sqrt().add_(1e-30), update)
    factor = -step_size if scale is None else _per_block(scale * -step_size, update)
    update = update * factor
    torch._foreach_add_(list(params), [u.view(p.shape) for u, p in zip(update.unbind(0), params)])
    if weight_decay != 0.0:
        decay = 1.0 - lr * weight_decay
        if isinstance(decay, Tensor):  # in the parameters' dtype, as a Python number would be
            decay = decay.to(params[0].dtype)
        torch._foreach_mul_(list(params), decay)


BasisStep = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int]]


def refresh_bases_(
    factors: Sequence[Tensor | None], bases: Sequence[Tensor | None], exp_avg: Tensor, exp_avg_sq: Tensor,
    basis_step: BasisStep = power_iteration_basis,
) -> int:
    """Refresh every basis in place by one power-iteration step; return how many failed.

    ``exp_avg_sq`` is re-indexed along each refreshed dimension so that every entry stays with
    its direction; ``exp_avg`` is carried exactly into the new bases. A block whose QR fails
    (also in float64) keeps its previous basis and order along that dimension. ``basis_step``
    computes ``(new_bases, order, failures)`` as :func:`power_iteration_basis` does (a
    distributed one shares the blocks' work out over ranks: :class:`mlfop.distributed.RefreshSharding`).
    """
    compute = next((b.dtype for b in bases if b is not None), exp_avg.dtype)
    momentum = unrotate(exp_avg.to(compute), bases)
    failures = 0
    for dim, (factor, basis) in enumerate(zip(factors, bases)):
        if basis is None:
            continue
        new_basis, order, failed = basis_step(factor, basis)
        axis = exp_avg_sq.dim() - len(bases) + dim
        index_shape = [1] * exp_avg_sq.dim()
        index_shape[0], index_shape[axis] = order.shape
        exp_avg_sq.copy_(torch.gather(exp_avg_sq, axis, order.view(index_shape).expand_as(exp_avg_sq)))
        basis.copy_(new_basis)
        failures += failed
    exp_avg.copy_(rotate(momentum, bases))
    return failures


def soap_update_(
    params: Sequence[Tensor],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    factors: Sequence[Tensor | None],
    bases: Sequence[Tensor | None],
    *,
    momentum_input: Tensor,
    second_moment_input: Tensor,
    factor_statistics: Sequence[Tensor | None],
    step: int,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    factor_beta: float,
    eps: float,
    weight_decay: float,
    precondition_frequency: int,
    correct_bias: bool,
    normalize_grads: bool,
    update_scale: Tensor | None = None,
    basis_step: BasisStep = power_iteration_basis,
) -> int:
    """One real SOAP step of a batch of blocks (all at step ``t = step >= 1``).

    The moments, factors and bases are stacked ``(B, ...)`` and updated in place; the bases
    refreshed at ``t % precondition_frequency == 0`` are first used at the next step, so a
    gradient never shapes its own projection. ``update_scale`` ``(B,)`` multiplies each block's
    update (ML-FOP-SOAP's step scale; ``None`` for SOAP). Returns how many
    basis refreshes failed (0 on steps without a refresh).
    """
    adam_moments_(exp_avg, exp_avg_sq, momentum_input, second_moment_input, beta1, beta2)
    compute = momentum_input.dtype  # the statistics' dtype, also for bfloat16 moments
    update = unrotate(exp_avg.to(compute) / soap_denominator(exp_avg_sq.to(compute), None, beta2, eps), bases)
    apply_update_(
        params,
        update,
        step_size=bias_corrected_step_size(lr, beta1, beta2, step, correct_bias),
        lr=lr,
        weight_decay=weight_decay,
        normalize=normalize_grads,
        scale=update_scale,
    )
    ema_factors_(factors, factor_statistics, factor_beta)
    if step % precondition_frequency == 0:
        return refresh_bases_(factors, bases, exp_avg, exp_avg_sq, basis_step)
    return 0
