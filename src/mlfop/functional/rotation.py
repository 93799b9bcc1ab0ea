r"""Per-dimension eigenbases: which dimensions of a block are rotated, and the rotations.

A parameter is handled as a *block* of shape :math:`(d_0, \dots, d_{n-1})`: its own shape, or,
with ``merge_dims``, the shape obtained by merging adjacent small dimensions. Each
*preconditioned* dimension :math:`i` carries an orthonormal basis :math:`Q_i`
(:math:`d_i \times d_i`); the others carry none and are left in the original coordinates.

.. math::
    \operatorname{rot}(X) = X \times_0 Q_0^\top \times_1 Q_1^\top \cdots
    \qquad
    \operatorname{unrot}(Y) = Y \times_0 Q_0 \times_1 Q_1 \cdots

where :math:`\times_i` contracts dimension :math:`i`. For a matrix,
:math:`\operatorname{rot}(X) = Q_L^\top X Q_R` and :math:`\operatorname{unrot}(Y) = Q_L Y Q_R^\top`.
The Kronecker statistics of a block contract every other dimension:
:math:`[X X^\top]_i = X_{(i)} X_{(i)}^\top`, the Gram matrix of the mode-:math:`i` unfolding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "merge_small_dims",
    "block_layout",
    "rotate",
    "unrotate",
    "kronecker_statistics",
]


def merge_small_dims(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
    """Merge adjacent dimensions, left to right, while their product stays ``<= max_precond_dim``.

    A dimension that alone exceeds ``max_precond_dim`` stays on its own (it will not be
    rotated). Size-1 dimensions are absorbed. ``(64, 3, 3, 3) -> (1728,)``, ``(3, 4) -> (12,)``,
    ``(20000, 5) -> (20000, 5)`` for ``max_precond_dim=10000``. Never returns an empty shape
    for a tensor with at least one dimension.
    """
    merged: list[int] = []
    run = 1
    for size in shape:
        if run * size <= max_precond_dim:
            run *= size
        elif run > 1:
            merged.append(run)
            run = size
        else:
            merged.append(size)
    if run > 1 or not merged:
        merged.append(run)
    return tuple(merged)


def block_layout(
    shape: Sequence[int], *, max_precond_dim: int, merge_dims: bool, precondition_1d: bool
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Return ``(block_shape, preconditioned)`` for a parameter of ``shape``.

    - 0-D: no dimension, nothing rotated (plain Adam).
    - 1-D: rotated only with ``precondition_1d`` and size ``<= max_precond_dim``.
    - N-D: every dimension of size ``<= max_precond_dim`` is rotated, after merging small
      dimensions when ``merge_dims`` is set.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return (), ()
    if len(shape) == 1:
        return shape, (precondition_1d and shape[0] <= max_precond_dim,)
    if merge_dims:
        shape = merge_small_dims(shape, max_precond_dim)
    return shape, tuple(size <= max_precond_dim for size in shape)


def _contract(x: Tensor, bases: Sequence[Tensor | None], basis_dim: int) -> Tensor:
    """Contract block dimension ``i`` of ``x`` with ``bases[i]`` (along the basis' ``basis_dim``).

    ``x`` may carry leading dimensions before the block's (e.g. one per gradient stream); they
    are left alone.
    """
    leading = x.dim() - len(bases)
    if len(bases) == 2:
        left, right = bases
        if left is not None:
            x = (left.T if basis_dim == 0 else left) @ x
        if right is not None:
            x = x @ (right if basis_dim == 0 else right.T)
        return x
    # Each contraction consumes the first block dimension and appends the result last, so
    # after a full cycle the block dimensions are back in their original order.
    for basis in bases:
        if basis is None:
            x = x.movedim(leading, -1)
        else:
            x = torch.tensordot(x, basis, dims=([leading], [basis_dim]))
    return x


def rotate(x: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    r""":math:`\operatorname{rot}(X)`: express ``x`` in the eigenbasis (``None`` = identity)."""
    return _contract(x, bases, 0)


def unrotate(y: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    r""":math:`\operatorname{unrot}(Y)`: bring ``y`` back from the eigenbasis."""
    return _contract(y, bases, 1)


def kronecker_statistics(x: Tensor, preconditioned: Sequence[bool]) -> list[Tensor | None]:
    r"""Per-dimension Gram matrices :math:`X_{(i)} X_{(i)}^\top` (``None`` where not rotated).

    Leading dimensions of ``x`` before the block's are summed over: for streams stacked as
    :math:`[\sqrt{w_k} X_k]_k` this gives :math:`\sum_k w_k X_{k(i)} X_{k(i)}^\top`.
    """
    leading = x.dim() - len(preconditioned)
    if leading == 0 and x.dim() == 2:
        left, right = preconditioned
        return [x @ x.T if left else None, x.T @ x if right else None]
    stats: list[Tensor | None] = []
    for i, rotated in enumerate(preconditioned):
        if not rotated:
            stats.append(None)
            continue
        others = [j for j in range(x.dim()) if j != leading + i]
        stats.append(torch.tensordot(x, x, dims=(others, others)))
    return stats
