r"""Attention-head slicing of a parameter block, and the per-head Gram matrices of K streams.

A *head layout* :math:`(H, a)` of a parameter :math:`W` of shape :math:`(n_0, \dots, n_{N-1})`
cuts axis :math:`a` into :math:`H` contiguous slices of :math:`d = n_a / H` indices each; head
:math:`h` owns

.. math::
    W^{(h)} = W[\,\dots, h d : (h + 1) d, \dots\,] \quad (\text{the slice taken along axis } a).

For attention projections stored as ``nn.Linear`` weights (out, in): q/k/v weights are cut by
output rows (:math:`a = 0`; k/v into the key-value heads under grouped-query attention), the
output projection by input columns (:math:`a = 1`), and a fused qkv weight by rows into one
chunk of ``head_dim`` rows per query, key and value head.

For two stacked tensors :math:`A = [a_1; \dots; a_K]` and :math:`B = [b_1; \dots; b_K]` of shape
:math:`(K, n_0, \dots, n_{N-1})`, the per-head Gram matrices are

.. math::
    G_h[i, j] = \sum_{x \in \text{head } h} a_i[x]\, b_j[x], \qquad h = 0, \dots, H - 1,

so that :math:`\sum_h G_h = A_{flat} B_{flat}^\top` (the whole-block Gram matrix) and a layout
with :math:`H = 1` gives exactly the whole-block matrix. These are the inner products the head
level of ML-FOP-SOAP needs (design doc section 4.1): with :math:`B = P(A)` they are the
:math:`H^{-1}`-metric products restricted to each head, a block-diagonal approximation across
heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mlfop.functional.rotation import rotate

__all__ = ["check_head_layout", "split_heads", "head_gram", "rotate_heads"]


def check_head_layout(shape: Sequence[int], num_heads: int, axis: int) -> tuple[int, int]:
    """Validate a head layout against a parameter shape; return ``(num_heads, axis)`` with
    ``axis`` made non-negative.

    ``axis`` may be negative (counted from the end, as in torch). Raises ``TypeError`` for a
    ``num_heads``/``axis`` that is not an ``int`` (``bool`` is refused), ``ValueError`` for
    ``num_heads < 1``, an axis out of range, or a ``num_heads`` that does not divide the size of
    the axis; messages name the shape, the axis and ``num_heads``.
    """
    shape = tuple(int(s) for s in shape)
    for name, value in (("num_heads", num_heads), ("axis", axis)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"head layout: {name} must be an int, got {type(value).__name__} {value!r}")
    if num_heads < 1:
        raise ValueError(f"head layout: num_heads must be >= 1, got {num_heads} (shape {shape}, axis {axis})")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"head layout: axis {axis} is out of range for a parameter of shape {shape} "
            f"({ndim} dimension{'s' if ndim != 1 else ''}; valid axes {-ndim}..{ndim - 1})"
        )
    axis = axis % ndim
    size = shape[axis]
    if size % num_heads != 0:
        raise ValueError(
            f"head layout: num_heads={num_heads} does not divide axis {axis} (size {size}) of a "
            f"parameter of shape {shape}"
        )
    return num_heads, axis


def split_heads(x: Tensor, num_heads: int, axis: int, leading: int = 0) -> Tensor:
    r"""A view of ``x`` with a head dimension.

    ``x`` has shape ``(*leading_dims, *shape)`` with ``len(leading_dims) == leading`` (e.g.
    ``leading=1`` for K stacked streams of a parameter). Dimension ``leading + axis`` (of size
    :math:`n`) is split into ``(num_heads, n / num_heads)`` and the head dimension is moved to
    position ``leading``::

        (*leading_dims, n_0, ..., n_axis, ..., n_{N-1})
            -> (*leading_dims, num_heads, n_0, ..., n_axis / num_heads, ..., n_{N-1})

    so that ``split_heads(x, H, a, leading)[..., h, ...]`` (index ``h`` at position ``leading``)
    is the slice of head ``h``: ``x.narrow(leading + a, h * d, d)`` with ``d = n_a / H``. ``axis``
    counts in the parameter's own dimensions and may be negative. The result shares storage
    with ``x``: writing into it writes into ``x``.
    """
    if isinstance(leading, bool) or not isinstance(leading, int) or not 0 <= leading <= x.dim():
        raise ValueError(f"split_heads: leading must be an int in 0..{x.dim()}, got {leading!r}")
    num_heads, axis = check_head_layout(x.shape[leading:], num_heads, axis)
    dim = leading + axis
    size = x.shape[dim]
    return x.unflatten(dim, (num_heads, size // num_heads)).movedim(dim, leading)


def head_gram(a: Tensor, b: Tensor, num_heads: int, axis: int) -> Tensor:
    r"""Per-head Gram matrices of two stacked tensors: shape ``(num_heads, K, K)``, float64, CPU.

    ``a`` and ``b`` have the same shape ``(K, *shape)``; ``axis`` indexes ``shape``. Entry
    ``[h, i, j]`` is :math:`\sum_{x \in \text{head } h} a_i[x]\, b_j[x]`. Computed with one batched
    contraction in the inputs' dtype on their device, then cast to float64 and moved to the CPU
    (like :func:`mlfop.functional.fop.stream_gram_matrices`, whose K x K algebra runs there).
    """
    if a.shape != b.shape:
        raise ValueError(f"head_gram: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"head_gram: expected stacked tensors of shape (K, *shape), got {tuple(a.shape)}")
    shape = tuple(a.shape[1:])
    num_heads, axis = check_head_layout(shape, num_heads, axis)
    k = a.shape[0]
    before = math.prod(shape[:axis])
    after = math.prod(shape[axis + 1 :])
    five_d = (k, before, num_heads, shape[axis] // num_heads, after)
    gram = torch.einsum("iphdq,jphdq->hij", a.reshape(five_d), b.reshape(five_d))
    return gram.to(dtype=torch.float64, device="cpu")


def rotate_heads(
    streams: Tensor, bases: Sequence[Tensor | None], shape: Sequence[int], num_heads: int, axis: int
) -> Iterator[Tensor]:
    r"""For each head :math:`h`, :math:`\operatorname{rot}(M_h)`: the rotation of the K streams
    masked to head :math:`h`'s slice (zero elsewhere).

    ``streams`` has shape ``(K, *block_shape)`` and ``shape`` is the parameter's shape (the
    head layout's). When the block has the parameter's shape, only rows ``h d : (h + 1) d`` of
    the head axis' basis meet the slice, so each head contracts the slice with those rows (the
    identity's rows where the axis is not rotated) and the H heads together cost about one
    rotation of the block instead of H. When ``merge_dims`` merged the parameter's dimensions,
    each masked tensor is rotated whole.
    """
    k, shape = streams.shape[0], tuple(shape)
    heads = split_heads(streams.reshape(k, *shape), num_heads, axis, leading=1)
    aligned = tuple(streams.shape[1:]) == shape
    d = shape[axis] // num_heads
    basis = None
    if aligned:
        basis = bases[axis] if bases[axis] is not None else torch.eye(shape[axis], dtype=streams.dtype,
                                                                      device=streams.device)
    for h in range(num_heads):
        if aligned:
            cut = basis[h * d : (h + 1) * d]
            yield rotate(heads[:, h], [cut if i == axis else b for i, b in enumerate(bases)])
        else:
            masked = torch.zeros_like(streams).reshape(k, *shape)
            split_heads(masked, num_heads, axis, leading=1)[:, h] = heads[:, h]
            yield rotate(masked.reshape(streams.shape), bases)
