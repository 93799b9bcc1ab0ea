r"""Hierarchical folding: per-stream gradient sums taken out of ordinary gradient accumulation.

The fold contract: ``p.grad`` keeps accumulating the total, as in any PyTorch loop, and a fold
records, per stream, what was added since the previous fold. With stream sums :math:`S_j`
(one stacked buffer of K slices per parameter) a fold of stream :math:`k` is

.. math::
    S_k \leftarrow \texttt{p.grad} - \textstyle\sum_{j \ne k} S_j

(:math:`\texttt{p.grad} = \sum_j S_j + \text{micro}` before the fold): elementwise work only,
as multi-tensor (``torch._foreach_*``) operations over all parameters, with no communication
and no value read back to the host. So everything that reads ``p.grad`` before ``step()`` keeps
working (DDP's own sync of the last micro-batch, ``clip_grad_norm_``, ``GradScaler``, grad-norm
logging), and :math:`\sum_k S_k = \texttt{p.grad}` up to a global rescale, which
:meth:`StreamFolds.finish` recovers and checks.

At the step, stream :math:`k`'s gradient is :math:`g_k = c\, S_k / a_k`, with :math:`a_k` its
natural share: its fraction of the step's loss tokens (``fold(..., tokens=n)``) or, without
token counts, of its micro-batches. With the natural weights :math:`w_k = a_k`,
:math:`\sum_k w_k g_k = c \sum_k S_k` is exactly the accumulated gradient, whatever loss
normalisation the loop used.

With the noise estimate on, each fold also keeps the squared norms of the micro-gradient it
folded (per head for the parameters with a head layout), on the parameters' device: level 0
of the hierarchy, scalars only.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Protocol

import torch
from torch import Tensor

from mlfop.fully_sharded import ShardLayout, is_sharded, local_tensor
from mlfop.functional.heads import split_heads
from mlfop.functional.streams import RESCALE_RTOL, natural_shares, rescale_factor, rescale_mismatch

__all__ = ["StreamFolds", "FoldCounts", "FinishedFolds", "FoldReducer", "UNTAGGED_STREAMS"]

UNTAGGED_STREAMS = ("even", "odd")

# Temporaries of the rescale check are made for parameters of at most this many elements at once.
_CHUNK_ELEMENTS = 2**26
# The fold order's code is a polynomial hash modulo this prime (exact in float64 collectives).
_ORDER_MODULUS = 2_147_483_647


@dataclass
class FoldCounts:
    """The plain counts of a step's folds, per stream (what ranks must agree on and add up)."""

    micro_batches: list[int]
    norm_counts: list[int]  # micro-batches whose norms are in the noise sums
    tokens: list[float]
    tokens_given: bool | None  # None before the first fold
    last_stream: int = -1
    order_code: int = 0  # a hash of the sequence of folded streams (what FSDP2's ranks must share)


class FoldReducer(Protocol):
    """Combines the folds of data-parallel ranks (see :mod:`mlfop.distributed`)."""

    syncs_every_fold: bool  # whether every fold's micro-gradient is already the ranks' joint one
    rounding: float  # relative rounding of the reduced stream sums (0: exact in their own dtype)

    def reduce(self, counts: FoldCounts, stream_sums: list[list[Tensor]], noise_sums: Tensor | None) -> FoldCounts:
        """Check the ranks agree on ``counts``, average ``stream_sums`` (per present stream, its
        buffers) and add up ``noise_sums`` in place; return the global counts."""

    def total(self, tensors: Sequence[Tensor]) -> None:
        """Add up, in place, sums that each rank took over its share of the parameters (a no-op
        where every rank holds every parameter)."""

    def any(self, flags: Tensor) -> Tensor:
        """The element-wise maximum of ``flags`` over the ranks."""


@dataclass
class FinishedFolds:
    """The folds of a step, reduced and checked: what the step needs from them."""

    present: list[int]  # indices of the streams folded this step
    shares: list[float]  # their natural shares a_k
    scale: Tensor  # c: p.grad = c * sum_k S_k (0-d)
    reach: dict[Tensor, tuple[bool, ...]] = field(default_factory=dict)  # per folded parameter


def _check_tokens(tokens: Real | Tensor | None) -> float | None:
    if tokens is None:
        return None
    if isinstance(tokens, Tensor):
        if tokens.numel() != 1:
            raise ValueError(f"tokens must be a single number, got a tensor of shape {tuple(tokens.shape)}")
        tokens = tokens.item()
    if isinstance(tokens, bool) or not isinstance(tokens, Real) or not 0 < tokens < math.inf:
        raise ValueError(
            f"tokens must be a positive number (the micro-batch's loss-token count), got {tokens!r}; "
            f"leave tokens out to weight streams by micro-batch counts"
        )
    return float(tokens)


def _chunks(items: Sequence[Any], numel: Any) -> Iterable[Sequence[Any]]:
    """Consecutive runs of ``items`` of at most :data:`_CHUNK_ELEMENTS` elements (at least one item)."""
    start, size = 0, 0
    for i, item in enumerate(items):
        if i > start and size + numel(item) > _CHUNK_ELEMENTS:
            yield items[start:i]
            start, size = i, 0
        size += numel(item)
    if start < len(items):
        yield items[start:]


def _norms(tensors: Sequence[Tensor], ord: float = 2.0) -> list[Tensor]:
    """Each tensor's norm (0-d), computed and returned in float32 at least (so that a bf16
    gradient's norm is not rounded to bf16); ``[]`` for no tensors."""
    norms: list[Tensor | None] = [None] * len(tensors)
    low = [t.dtype in (torch.float16, torch.bfloat16) for t in tensors]
    for widen in (True, False):
        chosen = [i for i, flag in enumerate(low) if flag == widen]
        if chosen:
            found = torch._foreach_norm([tensors[i] for i in chosen], ord, dtype=torch.float32 if widen else None)
            for i, norm in zip(chosen, found):
                norms[i] = norm
    return norms


def _head_squares(param: Tensor, micro: Tensor, num_heads: int, axis: int, start: int | None) -> Tensor:
    """``(H,)`` float64: the squared norm of each head's slice of ``micro`` (for this rank's rows
    of a sharded parameter, from row ``start`` on: its part of the sum, which the ranks add up)."""
    if start is None or axis != 0:  # (a row shard holds every column of its rows)
        return split_heads(micro, num_heads, axis).flatten(1).norm(dim=1, dtype=torch.float32).double().square()
    rows = micro.reshape(micro.shape[0], -1).norm(dim=1, dtype=torch.float32).double().square()
    placed = torch.zeros(param.shape[0], dtype=torch.float64, device=rows.device)
    placed[start : start + rows.numel()] = rows
    return placed.view(num_heads, -1).sum(1)


def _sum_sq(norms: list[Tensor]) -> Tensor:
    """:math:`\\sum_i n_i^2` in float64 of 0-d norms (0 for none)."""
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(norms).double().square().sum()


class StreamFolds:
    """The folds of one optimizer step: stacked stream sums, per-stream counts and noise sums.

    ``track_norms`` keeps the noise sums, per head for the parameters in ``head_layouts``.
    """

    def __init__(
        self, names: tuple[str, ...], track_norms: bool = False, head_layouts: dict[Tensor, tuple[int, int]] | None = None
    ) -> None:
        self.names = names
        self._index = {name: k for k, name in enumerate(names)}
        self._track_norms = track_norms
        self._head_layouts = dict(head_layouts or {})
        self._row_offsets: dict[Tensor, int] = {}
        self.reset()

    def reset(self) -> None:
        """Forget this step's folds (after ``step()`` or ``zero_grad()``)."""
        k = len(self.names)
        self._buffers: dict[Tensor, Tensor] = {}
        self._counts = FoldCounts([0] * k, [0] * k, [0.0] * k, None)
        self._noise_slots: dict[Tensor, slice] = {}  # each parameter's groups in the noise sums
        self._noise_order: list[Tensor] = []  # the parameters in the order of their slots
        self._noise_sums: Tensor | None = None  # (K, groups) float64 sums of |micro|^2
        self._pending_norms: Tensor | None = None  # the latest fold's, not yet in the sums
        self._pending_local = False  # whether they were all taken before DDP's sync (see record_local_micro)
        self._local_micro: dict[Tensor, Tensor] = {}  # per parameter, recorded by the hooks since the last fold
        self._grad_versions: list[tuple[weakref.ref, int]] | None = None
        self._reduced = False  # set once the sums were averaged across data-parallel ranks

    # ------------------------------------------------------------------ state queries
    @property
    def active(self) -> bool:
        """Whether any fold happened since the last reset."""
        return any(self._counts.micro_batches)

    @property
    def reduced(self) -> bool:
        """Whether the sums were already reduced across ranks (a refused step cannot redo it)."""
        return self._reduced

    def present(self) -> list[int]:
        """Indices of the streams folded at least once this step."""
        return [k for k, n in enumerate(self._counts.micro_batches) if n > 0]

    def shares(self, present: Sequence[int]) -> list[float]:
        """Natural shares ``a_k`` of the ``present`` streams (tokens, else micro-batches)."""
        counts = self._counts.tokens if self._counts.tokens_given else [float(n) for n in self._counts.micro_batches]
        return natural_shares([counts[k] for k in present])

    def has(self, param: Tensor) -> bool:
        """Whether any fold saw a gradient on ``param``."""
        return param in self._buffers

    def sums(self, param: Tensor, present: Sequence[int]) -> Tensor:
        """``(len(present), *param.shape)``: the present streams' sums for ``param`` (a view when
        every stream is present; zeros for a parameter no fold saw)."""
        buffer = self._buffers.get(param)
        if buffer is None:
            return torch.zeros((len(present), *param.shape), dtype=torch.promote_types(param.dtype, torch.float32),
                               device=param.device)
        return buffer if len(present) == len(self.names) else buffer[list(present)]

    def noise_inputs(self, param: Tensor, present: Sequence[int]) -> tuple[Tensor, list[int], list[int]] | None:
        """``(noise_sums (K, groups), micro_batches, norm_counts)`` of the present streams, or
        ``None`` without the noise estimate or without a measured fold of ``param``."""
        slot = self._noise_slots.get(param)
        if slot is None or self._noise_sums is None:
            return None
        counts = self._counts
        return (self._noise_sums[list(present), slot], [counts.micro_batches[k] for k in present],
                [counts.norm_counts[k] for k in present])

    def buffer_bytes(self) -> int:
        """Bytes held in stream buffers (at most K gradient-sized buffers per parameter)."""
        return sum(buffer.nbytes for buffer in self._buffers.values())

    # ------------------------------------------------------------------------- folding
    def _resolve(self, stream: str | None) -> int:
        if stream is None:
            if self.names != UNTAGGED_STREAMS:
                raise ValueError(
                    f"fold() needs a stream name, one of {list(self.names)}; untagged folding "
                    f"(stream=None) is for optimizers built with streams=None"
                )
            return sum(self._counts.micro_batches) % 2
        if stream not in self._index:
            raise ValueError(
                f"unknown stream {stream!r}; this optimizer was built with streams={list(self.names)}: "
                f"fold one of those, or add the name to streams="
            )
        return self._index[stream]

    def fold(self, stream: str | None, params: Iterable[Tensor], tokens: Real | Tensor | None) -> None:
        """Record what the last micro-batch(es) added to ``p.grad`` as stream ``stream``."""
        k = self._resolve(stream)
        token_count = _check_tokens(tokens)
        counts = self._counts
        if counts.tokens_given is not None and counts.tokens_given != (token_count is not None):
            raise ValueError(
                "fold(tokens=...) must be given for every fold of a step or for none; "
                "pass the number of loss tokens of each micro-batch, or leave tokens out everywhere"
            )
        params = list(params)
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad and any(is_sharded(p) for p in params):
            raise ValueError(
                "fold() found no gradient on any parameter of this FSDP2 model. Under "
                "set_requires_gradient_sync(False) FSDP2 keeps a micro-batch's gradient out of p.grad "
                "until the synced micro-batch, so its stream cannot be recorded: leave gradient sync on "
                "(FSDP2's default) for every micro-batch that you fold; each sync is a reduce-scatter, "
                "and the stream sums stay sharded"
            )
        if not with_grad:
            raise ValueError(
                "fold() found no gradient on any parameter; call it after loss.backward() of the "
                "micro-batch, before optimizer.zero_grad()"
            )
        if any(p.grad.layout != torch.strided for p in with_grad):
            raise TypeError("fold() does not support sparse gradients; use dense ones")
        if self._unchanged_since_last_fold(with_grad):
            raise ValueError(
                "fold() found p.grad unchanged since the previous fold: call fold() once after each "
                "micro-batch's backward(); folding twice would count the same gradient twice"
            )
        self._commit_pending_norms()
        self._add_micro_gradients(k, with_grad)
        counts.micro_batches[k] += 1
        counts.last_stream = k
        counts.order_code = (counts.order_code * 31 + k + 1) % _ORDER_MODULUS
        counts.tokens_given = token_count is not None
        if token_count is not None:
            counts.tokens[k] += token_count
        # Weak references: a gradient replaced by a new tensor must not be mistaken for the old
        # one whose id it may reuse, and no old gradient is kept alive.
        self._grad_versions = [(weakref.ref(p.grad), local_tensor(p.grad)._version) for p in with_grad]

    def _add_micro_gradients(self, k: int, with_grad: list[Tensor]) -> None:
        """:math:`S_k \\leftarrow S_k + (\\texttt{p.grad} - \\sum_j S_j)` for every parameter, as
        multi-tensor operations; with the noise estimate the micro-gradients' norms are kept."""
        for param in with_grad:
            if param not in self._buffers:  # this rank's rows of a sharded parameter
                dtype = torch.promote_types(param.dtype, torch.float32)
                shape = local_tensor(param).shape
                self._buffers[param] = torch.zeros((len(self.names), *shape), dtype=dtype, device=param.device)
        grads = [local_tensor(p.grad) for p in with_grad]
        buffers = [self._buffers[p] for p in with_grad]
        own = [b[k] for b in buffers]
        if self._track_norms:
            totals = [b.sum(0) for b in buffers] if len(self.names) > 2 else torch._foreach_add(
                [b[0] for b in buffers], [b[1] for b in buffers])
            micro = torch._foreach_sub(grads, totals)
            self._pending_norms = self._micro_norms(with_grad, micro)
            torch._foreach_add_(own, micro)
            return
        torch._foreach_copy_(own, grads)  # S_k = p.grad - sum_{j != k} S_j
        for j in range(len(self.names)):
            if j != k:
                torch._foreach_sub_(own, [b[j] for b in buffers])

    def _row_offset(self, param: Tensor) -> int | None:
        """The first row of this rank's piece of a sharded parameter (``None`` for a plain one)."""
        if not is_sharded(param):
            return None
        if param not in self._row_offsets:
            self._row_offsets[param] = ShardLayout.of(param, "ML-FOP-SOAP").offset
        return self._row_offsets[param]

    def _unchanged_since_last_fold(self, with_grad: list[Tensor]) -> bool:
        """Whether every gradient is the tensor of the previous fold, not modified since (its
        version counter, which every in-place accumulation bumps): no host read."""
        seen = self._grad_versions
        return seen is not None and len(seen) == len(with_grad) and all(
            ref() is p.grad and version == local_tensor(p.grad)._version for (ref, version), p in zip(seen, with_grad)
        )

    def record_local_micro(self, param: Tensor) -> None:
        """Keep the squared norm of what this rank's backward has added to ``param.grad`` since
        the last fold (per head where heads apply), before DDP replaces the synced micro-batch's
        gradient by the ranks' average: a post-accumulate-grad hook calls this under DDP
        (:class:`mlfop.distributed.LocalMicroNorms`), so that the synced micro-batch is a sample
        of the noise estimate like the others. The fold then takes it instead of its own."""
        if not self._track_norms or param.grad is None:
            return
        buffer = self._buffers.get(param)
        micro = param.grad if buffer is None else param.grad - (buffer.sum(0) if len(self.names) > 2 else buffer[0] + buffer[1])
        if param in self._head_layouts:
            self._local_micro[param] = _head_squares(param, micro, *self._head_layouts[param], None)
        else:
            self._local_micro[param] = _norms([micro])[0].view(1).double().square()

    def _micro_norms(self, params: list[Tensor], micro: list[Tensor]) -> Tensor:
        """The squared norms of this fold's micro-gradients, laid out as the noise sums' groups
        (those that the hooks recorded before DDP's sync, where they did)."""
        for param in params:
            if param not in self._noise_slots:
                start = self._noise_slots[self._noise_order[-1]].stop if self._noise_order else 0
                groups = self._head_layouts[param][0] if param in self._head_layouts else 1
                self._noise_slots[param] = slice(start, start + groups)
                self._noise_order.append(param)
        recorded, self._local_micro = self._local_micro, {}
        self._pending_local = all(p in recorded for p in params)
        squares: list[Tensor | None] = [recorded.get(p) for p in params]
        plain = [i for i, p in enumerate(params) if squares[i] is None and p not in self._head_layouts]
        for i, norm in zip(plain, _norms([micro[i] for i in plain])):
            squares[i] = norm.view(1).double().square()
        for i, param in enumerate(params):
            if squares[i] is None:
                squares[i] = _head_squares(param, micro[i], *self._head_layouts[param], self._row_offset(param))
        flat = torch.cat(squares)
        if len(params) == len(self._noise_order) and all(a is b for a, b in zip(params, self._noise_order)):
            return flat
        total = self._noise_slots[self._noise_order[-1]].stop
        pending = torch.zeros(total, dtype=torch.float64, device=flat.device)
        index = torch.cat([torch.arange(self._noise_slots[p].start, self._noise_slots[p].stop) for p in params])
        return pending.index_copy_(0, index.to(flat.device), flat)

    def _commit_pending_norms(self, keep: bool = True) -> None:
        """Add the latest fold's micro norms to the noise sums (``keep``), or drop them.

        Under DDP the last micro-batch before the step is the synced one: the fold sees the rank
        average minus this rank's earlier folds, not a sample, so its norms are dropped unless
        the hooks recorded them before the sync.
        """
        pending, self._pending_norms = self._pending_norms, None
        if pending is None or not keep:
            return
        k = self._counts.last_stream
        if self._noise_sums is None:
            self._noise_sums = torch.zeros(len(self.names), pending.numel(), dtype=torch.float64, device=pending.device)
        elif self._noise_sums.shape[1] < pending.numel():
            grown = pending.numel() - self._noise_sums.shape[1]
            self._noise_sums = torch.nn.functional.pad(self._noise_sums, (0, grown))
        self._noise_sums[k, : pending.numel()] += pending
        self._counts.norm_counts[k] += 1

    # --------------------------------------------------------------------------- finish
    def finish(self, grads: Sequence[tuple[Tensor, Tensor]], reducer: FoldReducer | None) -> FinishedFolds:
        """Reduce the folds across ranks (``reducer``), then check ``p.grad`` against them.

        ``grads`` are the ``(param, grad)`` pairs of the step. Returns the present streams, their
        shares, the global factor :math:`c` with ``p.grad = c * sum_k S_k`` and, per folded
        parameter, which present streams reach it (a non-zero sum). Raises ``ValueError`` (on
        every rank) when ``p.grad`` changed after the last fold by more than a global factor;
        nothing is changed then but the reduction. One host read, for the mismatch flag and the
        reach of every parameter together.
        """
        self._commit_pending_norms(keep=reducer is None or reducer.syncs_every_fold or self._pending_local)
        folded = [(p, g) for p, g in grads if p in self._buffers]
        if reducer is not None and not self._reduced:
            stream_sums = [[self._buffers[p][k] for p, _ in folded] for k in self.present()]
            self._counts = reducer.reduce(self._counts, stream_sums, self._noise_sums)
            self._reduced = True
        present = self.present()
        sums = [self.sums(p, present) for p, _ in folded]
        grad_sq = _sum_sq(_norms([g for _, g in grads]))
        stream_norms = _norms([s[i] for s in sums for i in range(len(present))])  # a stream reaches where > 0
        streams_sq = _sum_sq(stream_norms)
        sums_sq, residuals = self._rescale_pass(folded, sums)
        if reducer is not None:  # (sharded parameters: each rank summed over its own)
            reducer.total([grad_sq, streams_sq, sums_sq])
        scale = rescale_factor(grad_sq.to(streams_sq.device), sums_sq)
        residual_sq = _sum_sq([*residuals(scale), *_norms([g for p, g in grads if p not in self._buffers])])
        if reducer is not None:
            reducer.total([residual_sq])
        rtol = max(RESCALE_RTOL, 0.0 if reducer is None else reducer.rounding)
        mismatch = rescale_mismatch(residual_sq.to(scale.device), grad_sq.to(scale.device), streams_sq, scale,
                                    len(present), rtol)
        if reducer is not None:
            mismatch = reducer.any(mismatch.double()) > 0
        flags = mismatch.view(1).double()
        if stream_norms:
            flags = torch.cat([flags, (torch.stack(stream_norms) > 0).double()])
        read = flags.tolist()
        if read[0]:
            residual, total = float(residual_sq.sqrt()), float(grad_sq.sqrt())
            raise ValueError(
                "p.grad no longer matches the folded streams beyond a global scale (relative "
                f"residual {residual / max(total, 1e-300):.3g}): fold() after every micro-batch's "
                "backward, change p.grad after the last fold only by a global factor "
                "(clip_grad_norm_, GradScaler.unscale_), and under DDP let the last micro-batch sync "
                "(no_sync() on the others only). No parameter or state was changed."
            )
        k = len(present)
        reach = {p: tuple(bool(read[1 + i * k + j]) for j in range(k)) for i, (p, _) in enumerate(folded)}
        return FinishedFolds(present, self.shares(present), scale, reach)

    def _rescale_pass(self, folded: list[tuple[Tensor, Tensor]], sums: list[Tensor]):
        """``(||sum_k S_k||^2, residuals)``: the totals' squared norm, and a function of ``c``
        giving the norms of ``p.grad - c sum_k S_k``; temporaries are made chunk by chunk."""
        pairs = list(zip(folded, sums))
        chunks = list(_chunks(pairs, lambda pair: pair[1][0].numel()))
        sums_sq = _sum_sq([n for chunk in chunks for n in _norms([s.sum(0) for _, s in chunk])])

        def residuals(scale: Tensor) -> list[Tensor]:
            norms = []
            for chunk in chunks:
                scaled = torch._foreach_mul([s.sum(0) for _, s in chunk], scale.to(chunk[0][1].dtype))
                norms += _norms(torch._foreach_sub([g.to(s.dtype) for (_, g), s in chunk], scaled))
            return norms

        return sums_sq, residuals

    def record_group_sums(self, params: Sequence[Tensor], sums: Sequence[Tensor]) -> None:
        """Take the two sub-batch streams of dual-gradient groups (:class:`mlfop.distributed.DualGradientGroups`):
        ``sums[i]`` is ``(2, *shape)``, the even and the odd ranks' share of ``params[i]``'s
        averaged gradient (so they add up to it), already global; each group counts as one
        micro-batch (equal shares). Called by the DDP communication hook, per bucket."""
        if self.names != UNTAGGED_STREAMS:
            raise ValueError(
                "dual-gradient groups give the untagged streams ('even', 'odd'): build the optimizer with "
                f"streams=None, not {list(self.names)}"
            )
        for param, stacked in zip(params, sums):
            self._buffers[param] = stacked
        self._counts = FoldCounts([1, 1], [0, 0], [0.0, 0.0], False, last_stream=1)
        self._reduced = True  # nothing left to reduce at the step

    def local_sums(self, param: Tensor) -> Tensor | None:
        """``(K, *rows)``: this rank's stacked stream sums of ``param`` (``None`` if no fold saw it)."""
        return self._buffers.get(param)

    def take_owned(self, sums: dict[Tensor, Tensor]) -> None:
        """Replace the sharded stream sums by the whole sums ``(K, *shape)`` of the parameters this
        rank owns (:mod:`mlfop.fully_sharded`); the others leave this rank's step."""
        self._buffers = dict(sums)

    # ------------------------------------------------------------------ reading back
    def stream_gradients(self, params: Sequence[Tensor]) -> dict[str, list[Tensor | None]]:
        """This rank's ``g_k = S_k / a_k`` of the folds so far, per parameter (``None`` for a
        parameter no fold saw), before any rescale of ``p.grad`` and any cross-rank reduction."""
        present = self.present()
        shares = self.shares(present) if present else []
        return {
            self.names[k]: [self._buffers[p][k] / share if p in self._buffers else None for p in params]
            for k, share in zip(present, shares)
        }
