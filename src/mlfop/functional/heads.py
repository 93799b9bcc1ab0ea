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

For the head level of ML-FOP-SOAP (design doc section 4.1), FOP runs on each head's subspace:
the K streams masked to the head's slice (zero elsewhere) and rotated, so that the metric's
inner products restricted to the head are exact; the coupling between heads is dropped (a
block-diagonal approximation). One head is exactly the layer level. Since rotations are linear,
:math:`g_{comb} = \sum_h \sum_k c_{hk} \operatorname{rot}(M_h g_k) =
\operatorname{rot}(\sum_k C_k \odot g_k)` with :math:`C_k` the coefficients broadcast over each
head's slice: the combination costs one rotation, not H.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mlfop.functional.fop import (
    Combination,
    combination_coefficients,
    combine,
    fop_system,
    noise_shrinkage,
    solve_beta,
    step_scale,
    stream_grams,
)
from mlfop.functional.rotation import rotate
from mlfop.functional.streams import ordered_sum

__all__ = ["check_head_layout", "split_heads", "rotate_heads", "combine_heads"]


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


def rotate_heads(
    streams: Tensor, bases: Sequence[Tensor | None], shape: Sequence[int], num_heads: int, axis: int
) -> Iterator[Tensor]:
    r"""For each head :math:`h`, :math:`\operatorname{rot}(M_h)`: the rotation of the streams
    masked to head :math:`h`'s slice (zero elsewhere).

    ``streams`` is ``(..., *block_shape)`` (leading stream and batch axes; batched bases
    ``(B, d, d)`` go with a leading batch axis of ``B``) and ``shape`` the parameter's shape
    (the head layout's). When the block has the parameter's shape, the dimensions other than
    the head axis are rotated once for all heads, and each head contracts its slice with its
    rows :math:`h d : (h + 1) d` of the head axis' basis (the identity's rows where the axis is
    not rotated): the H heads together cost about one rotation. When ``merge_dims`` merged the
    parameter's dimensions, each masked tensor is rotated whole.
    """
    shape = tuple(shape)
    block = tuple(streams.shape[streams.dim() - len(bases):])
    leading = streams.dim() - len(block)
    d = shape[axis] // num_heads
    if block != shape:
        for h in range(num_heads):
            masked = torch.zeros_like(streams).reshape(*streams.shape[:leading], *shape)
            source = streams.reshape(masked.shape)
            split_heads(masked, num_heads, axis, leading=leading).select(leading, h).copy_(
                split_heads(source, num_heads, axis, leading=leading).select(leading, h)
            )
            yield rotate(masked.reshape(streams.shape), bases)
        return
    others = rotate(streams, [None if i == axis else basis for i, basis in enumerate(bases)])
    heads = split_heads(others, num_heads, axis, leading=leading)
    basis = bases[axis]
    if basis is None:
        basis = torch.eye(shape[axis], dtype=streams.dtype, device=streams.device)
    for h in range(num_heads):
        cut = basis[..., h * d : (h + 1) * d, :]
        yield rotate(heads.select(leading, h), [cut if i == axis else None for i in range(len(bases))])


def combine_heads(
    streams: Tensor,
    rotated: Tensor,
    second_moment: Tensor,
    h: Tensor,
    bases: Sequence[Tensor | None],
    shape: Sequence[int],
    layout: tuple[int, int],
    weights: Tensor,
    order: Tensor | None,
    *,
    eps_fop: float,
    beta_max: float,
    eta_range: tuple[float, float],
    sigma_sq: Tensor | None = None,
) -> Combination:
    r"""The head level's combination of a batch of blocks: FOP on each head's subspace, summed.

    ``streams`` ``(B, K, *block)`` in the original basis and ``rotated`` (their rotation),
    ``second_moment`` :math:`W \sum_k w_k r_k^2` and the metric ``h``, all of the block's shape;
    ``layout`` ``(H, axis)``; ``sigma_sq`` ``(B, K, H)`` the per-head noise estimate. Returns a
    :class:`~mlfop.functional.fop.Combination` whose ``beta``/``coefficients``/``system`` are per
    head ``(B, H, ...)``; its step scale is :func:`~mlfop.functional.fop.step_scale` of the
    summed direction against the shared component (1 where no head is corrected).
    """
    num_heads, axis = layout
    batch, k = streams.shape[:2]
    flat_h = h.flatten(1)
    grams = [stream_grams(head.flatten(2), flat_h) for head in rotate_heads(streams, bases, shape, num_heads, axis)]
    system = fop_system(*(torch.stack(parts, dim=1) for parts in zip(*grams)), weights, eps_fop)
    beta_raw = beta = solve_beta(system.d, system.e, system.spread, system.spread_reference, beta_max)
    noise_fraction = None
    if sigma_sq is not None:
        rho, noise_fraction = noise_shrinkage(sigma_sq.transpose(1, 2), system.gram_e, system.weights)
        beta = beta_raw * rho[..., None]
    coefficients = combination_coefficients(system, beta)  # (B, H, K)
    per_head = coefficients.transpose(1, 2).to(streams.dtype)  # (B, K, H)
    sliced = split_heads(streams.reshape(batch, k, *shape), num_heads, axis, leading=2)
    weighted = sliced * per_head.view(batch, k, num_heads, *[1] * (sliced.dim() - 3))
    combined = ordered_sum(weighted, order).movedim(1, 1 + axis).reshape(batch, *streams.shape[2:])
    momentum = rotate(combined, bases).flatten(1)
    shared = combine(rotated.flatten(2), weights)
    eta = step_scale((shared * momentum / flat_h).sum(-1).double(), (momentum.square() / flat_h).sum(-1).double(), eta_range)
    corrected = (coefficients != system.weights).any(-1).any(-1)
    return Combination(
        momentum=momentum,
        second_moment=torch.maximum(second_moment.flatten(1), momentum.square()),
        eta=torch.where(corrected, eta, 1.0),
        beta_raw=beta_raw,
        beta=beta,
        noise_fraction=noise_fraction,
        system=system,
        coefficients=coefficients,
    )
