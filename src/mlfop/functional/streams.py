r"""The gradient streams before the Fisher-orthogonal combination: weights, reach, statistics.

With stream sums :math:`S_k` folded out of gradient accumulation, natural shares :math:`a_k`
(loss tokens, or micro-batches) and a global rescale :math:`c` of ``p.grad`` after the last fold
(clipping, unscaling), the stream gradients are :math:`g_k = c\, S_k / a_k`. Of the streams
present in a step:

- the weights :math:`w_k` (:func:`stream_weights`) decide how much each counts in the shared
  component :math:`\bar g = \sum_k w_k g_k`;
- the reach :math:`W = \sum_{k \text{ reaching}} w_k` of a block is the weight of the streams
  with a non-zero gradient on it (1 unless a module is outside some modality's reach);
- the curvature statistics are the streams' second moments, scaled by the reach:
  :math:`F_i \mathrel{+}= W \sum_k w_k G_{k(i)} G_{k(i)}^\top` and
  :math:`V \mathrel{+}= W \sum_k w_k r_k^2` (:func:`stream_factor_statistics`,
  :func:`stream_second_moment`), so that streams that agree, or a block that one stream
  reaches, get SOAP's statistics.

The sums over streams are order-independent: for K = 2 one addition (exactly symmetric in the
streams), for more streams an order fixed by the streams' sizes, never by their names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mlfop.functional.rotation import kronecker_statistics

__all__ = [
    "natural_shares",
    "stream_weights",
    "reach_weight",
    "stream_order",
    "ordered_sum",
    "stream_second_moment",
    "stream_factor_statistics",
    "rescale_factor",
    "rescale_mismatch",
    "update_norm_ema",
]

# A rescale of p.grad after the last fold (clipping, unscaling) must be one global scalar: the
# residual p.grad - c * sum_k S_k may only be rounding, relative to the streams' size.
RESCALE_RTOL = 1e-5


def natural_shares(counts: Sequence[float]) -> list[float]:
    """:math:`a_k = n_k / \\sum_j n_j` of the present streams' token or micro-batch counts."""
    total = sum(counts)
    return [count / total for count in counts]


def stream_weights(
    mode: str | Mapping[str, float],
    names: Sequence[str],
    shares: Sequence[float],
    norm_ema: Tensor | None,
    alpha: float,
    device: torch.device,
) -> Tensor:
    r"""The weights ``(K,)`` (float64, on ``device``, sum 1) of the present streams ``names``.

    ``"tokens"``: the natural shares (:math:`\bar g` is then exactly the accumulated gradient);
    ``"fixed"``: equal; a mapping: the given weights, renormalised over the present streams
    (natural if they are all zero); ``"balanced"``: :math:`w_k \propto
    \mathrm{EMA}(\lVert g_k\rVert_{H^{-1}})^{-\alpha}` from ``norm_ema`` ``(K,)``, or equal when
    some present stream has no EMA yet (``norm_ema=None``).
    """
    natural = torch.tensor(list(shares), dtype=torch.float64, device=device)
    if mode == "tokens":
        return natural
    if mode == "fixed" or (mode == "balanced" and norm_ema is None):
        return torch.full((len(names),), 1.0 / len(names), dtype=torch.float64, device=device)
    if mode == "balanced":
        weights = norm_ema.to(dtype=torch.float64, device=device).clamp_min(1e-30).pow(-alpha)
        return weights / weights.sum()
    given = [float(mode[name]) for name in names]
    if sum(given) <= 0.0:
        return natural
    return torch.tensor([value / sum(given) for value in given], dtype=torch.float64, device=device)


def reach_weight(weights: Tensor, reaching: Sequence[bool]) -> Tensor:
    """:math:`W = \\sum_{k \\text{ reaching}} w_k` (0-d) for a reach pattern known on the host."""
    mask = torch.tensor(list(reaching), dtype=torch.bool, device=weights.device)
    return torch.where(mask, weights, 0.0).sum()


def stream_order(streams: Tensor) -> Tensor | None:
    """A name-independent order of the streams of each block, ``(B, K)`` (by squared norm), for
    sums over streams; ``None`` for K <= 2, where one addition is symmetric anyway."""
    if streams.shape[1] <= 2:
        return None
    return torch.argsort(streams.flatten(2).square().sum(-1), dim=1)


def ordered_sum(terms: Tensor, order: Tensor | None) -> Tensor:
    """:math:`\\sum_k` of ``terms`` ``(B, K, ...)`` over axis 1, in ``order`` (see :func:`stream_order`)."""
    if order is not None:
        terms = torch.take_along_dim(terms, order.view(*order.shape, *[1] * (terms.dim() - 2)), dim=1)
    total = terms[:, 0] + terms[:, 1] if terms.shape[1] > 1 else terms[:, 0].clone()
    for k in range(2, terms.shape[1]):
        total += terms[:, k]
    return total


def _per_stream(values: Tensor, like: Tensor) -> Tensor:
    """``(K,)`` (or ``(B, K)``) values shaped to broadcast over ``(B, K, ...)``."""
    values = values.to(like.dtype)
    if values.dim() == 1:
        values = values.unsqueeze(0)
    return values.view(*values.shape, *[1] * (like.dim() - 2))


def stream_second_moment(rotated: Tensor, weights: Tensor, reach: Tensor, order: Tensor | None) -> Tensor:
    r""":math:`W \sum_k w_k r_k^2`: ``rotated`` ``(B, K, *block)``, ``reach`` :math:`W` 0-d or ``(B,)``."""
    scale = weights.to(rotated.dtype) * reach.to(rotated.dtype).view(-1, 1)
    return ordered_sum(rotated.square().mul_(_per_stream(scale, rotated)), order)


def stream_factor_statistics(
    streams: Tensor,
    weights: Tensor,
    reach: Tensor,
    preconditioned: Sequence[bool],
    order: Tensor | None,
    shared_only: bool = False,
) -> list[Tensor | None]:
    r"""Kronecker statistics of the streams ``(B, K, *block)``: :math:`W \sum_k w_k G_{k(i)} G_{k(i)}^\top`,
    or, ``shared_only``, :math:`\bar G_{(i)} \bar G_{(i)}^\top` of the shared component (SOAP's
    own statistic under the natural weights; K - 1 fewer products)."""
    if shared_only:
        shared = ordered_sum(streams * _per_stream(weights, streams), order)
        return kronecker_statistics(shared, preconditioned, batch_dims=1)
    scale = weights.to(streams.dtype) * reach.to(streams.dtype).view(-1, 1)
    statistics = []
    for stat in kronecker_statistics(streams, preconditioned, batch_dims=2):  # (B, K, d, d), ours
        statistics.append(None if stat is None else ordered_sum(stat.mul_(_per_stream(scale, stat)), order))
    return statistics


def rescale_factor(grad_sq: Tensor, sums_sq: Tensor) -> Tensor:
    """The global factor :math:`c = \\lVert p.grad\\rVert / \\lVert \\sum_k S_k\\rVert` (0-d), 1 when
    within 1e-6 of 1 or when the streams are all zero."""
    c = torch.where(sums_sq > 0, (grad_sq / torch.where(sums_sq > 0, sums_sq, 1.0)).sqrt(), 1.0)
    return torch.where((c - 1.0).abs() <= 1e-6, 1.0, c)


def rescale_mismatch(residual_sq: Tensor, grad_sq: Tensor, streams_sq: Tensor, c: Tensor, streams: int,
                     rtol: float = RESCALE_RTOL) -> Tensor:
    """Whether ``p.grad - c sum_k S_k`` is more than rounding: its norm above
    ``rtol (||p.grad|| + c K ||S||)`` (1e-5 unless the sums crossed the ranks in a narrower
    dtype), with :math:`\\lVert S\\rVert` the streams' joint norm (0-d bool)."""
    tolerance = rtol * (grad_sq.sqrt() + c * streams * streams_sq.sqrt())
    return residual_sq.sqrt() > tolerance


def update_norm_ema(ema: Tensor, started: Sequence[bool], present: Sequence[int], norms: Tensor, beta: float) -> Tensor:
    """The EMA ``(K,)`` of every stream's norm :math:`\\lVert g_k\\rVert_{H^{-1}}` (for
    ``"balanced"``) after this step's ``norms`` of the ``present`` streams; a stream whose EMA
    has not ``started`` takes its first norm as is."""
    index = torch.tensor(list(present), device=ema.device)
    first = torch.tensor([not started[k] for k in present], device=ema.device)
    previous = ema.index_select(0, index)
    return ema.index_copy(0, index, torch.where(first, norms, previous * beta + norms * (1.0 - beta)))
