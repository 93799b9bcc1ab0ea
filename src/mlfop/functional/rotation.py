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


def _contract_batched(x: Tensor, q: Tensor, dim: int) -> Tensor:
    """Contract dimension ``dim`` of ``x`` ``(B, ...)`` with the batch of matrices ``q`` ``(B, a, b)``.

    The other dimensions are folded into the matrix product's free side (never the basis
    broadcast over them, which would copy it), so that each block costs one ``bmm``.
    """
    batch = q.shape[0]
    if dim == x.dim() - 1:
        return (x.reshape(batch, -1, q.shape[-2]) @ q).view(*x.shape[:-1], q.shape[-1])
    moved = x.movedim(dim, 1)
    product = q.mT @ moved.reshape(batch, moved.shape[1], -1)
    return product.view(batch, q.shape[-1], *moved.shape[2:]).movedim(1, dim)


def _contract(x: Tensor, bases: Sequence[Tensor | None], transpose: bool) -> Tensor:
    r"""Contract the last ``len(bases)`` dimensions of ``x``, each with its basis:
    :math:`y_{\dots b \dots} = \sum_a x_{\dots a \dots} Q_{ab}` (``Q`` transposed with ``transpose``).

    A basis is ``(a, b)``, or ``(B, a, b)`` for a batch of blocks stacked along ``x``'s first
    dimension. Dimensions of ``x`` before the block's (a batch axis, one per gradient stream)
    are left alone. ``a != b`` is allowed (rows of a basis, for one attention head's slice).
    The last dimension goes first: its product needs no copy of ``x``.
    """
    n = len(bases)
    for i in reversed(range(n)):
        basis = bases[i]
        if basis is None:
            continue
        q = basis.mT if transpose else basis
        dim = x.dim() - n + i
        if q.dim() == 3:
            x = _contract_batched(x, q, dim)
        elif dim == x.dim() - 1:
            x = x @ q
        else:
            x = (x.movedim(dim, -1) @ q).movedim(-1, dim)
    return x


def rotate(x: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    r""":math:`\operatorname{rot}(X)`: express ``x`` in the eigenbasis (``None`` = identity)."""
    return _contract(x, bases, transpose=False)


def unrotate(y: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    r""":math:`\operatorname{unrot}(Y)`: bring ``y`` back from the eigenbasis."""
    return _contract(y, bases, transpose=True)


def kronecker_statistics(x: Tensor, preconditioned: Sequence[bool], batch_dims: int = 0) -> list[Tensor | None]:
    r"""Per-dimension Gram matrices :math:`X_{(i)} X_{(i)}^\top` (``None`` where not rotated).

    The block is ``x``'s last ``len(preconditioned)`` dimensions. The first ``batch_dims``
    dimensions are kept (a batch of blocks gives ``(B, d_i, d_i)``); the dimensions between
    them and the block's are summed over: for streams stacked as :math:`[\sqrt{w_k} X_k]_k` this
    gives :math:`\sum_k w_k X_{k(i)} X_{k(i)}^\top`, one matrix product per dimension.
    """
    n = len(preconditioned)
    kept = x.shape[:batch_dims]
    plain_matrix = x.dim() - batch_dims == 2
    stats: list[Tensor | None] = []
    for i, rotated in enumerate(preconditioned):
        if not rotated:
            stats.append(None)
        elif plain_matrix:
            stats.append(x @ x.mT if i == 0 else x.mT @ x)
        else:
            dim = x.dim() - n + i
            unfolded = x.movedim(dim, batch_dims).reshape(*kept, x.shape[dim], -1)
            stats.append(unfolded @ unfolded.mT)
    return stats
