"""Data parallelism for the stream folds: reducers that agree across ranks, then combine the folds.

A :class:`~mlfop.folding.FoldReducer` is what :meth:`mlfop.folding.StreamFolds.finish` calls
before the rescale check. :class:`DDPFoldReducer` serves DDP: each rank folds its own
micro-batches (with ``no_sync()`` on all but the last, so that DDP itself averages the total in
``p.grad``). At ``step()`` every rank first exchanges a small descriptor of its folds; if the
ranks disagree (a stream folded on some ranks only, different micro-batch counts, different
parameters with gradients) every rank raises the same ``ValueError`` instead of hanging in a
mismatched collective. Then each stream's buffers are averaged over the ranks, one flat bucket
per stream, and the counts are added up. After that every rank holds the same stream sums and
takes the same step as a single process that saw the whole global batch. Every tensor that
enters a collective lives on the buffers' device (CUDA for NCCL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from mlfop.folding import FoldCounts
from mlfop.functional.soap import power_iteration_basis

__all__ = ["default_process_group", "all_reduce_flat", "DDPFoldReducer", "ShardedFoldReducer", "RefreshSharding", "LocalMicroNorms", "DualGradientGroups"]


def default_process_group():
    """The world group when ``torch.distributed`` runs with more than one rank, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_reduce_flat(tensors: Sequence[Tensor], group, divisor: float, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Sum ``tensors`` over the ranks in one flat bucket (on ``device``, else the first
    tensor's; in ``dtype``, else theirs), copy back in place and divide by ``divisor``."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(device=device or tensors[0].device, dtype=dtype or t.dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    tensors = list(tensors)
    torch._foreach_copy_(tensors, [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
    if divisor != 1.0:
        torch._foreach_div_(tensors, divisor)


class DDPFoldReducer:
    """Average the folds of data-parallel replicas over ``group``."""

    syncs_every_fold = False  # DDP syncs the last micro-batch only

    def __init__(self, group, device: torch.device, communication_dtype: torch.dtype | None = None) -> None:
        self.group = group
        self.device = device
        self.communication_dtype = communication_dtype  # of the stream sums (bfloat16 halves their bytes)
        # The rescale check then allows the narrower dtype's rounding of the reduced sums.
        self.rounding = 0.0 if communication_dtype is None else torch.finfo(communication_dtype).eps

    def _agree(self, counts: FoldCounts, parameters: int, elements: int) -> list[list[float]]:
        """All ranks' descriptors (``world`` rows of ``4 + 3K`` numbers, read back in one
        transfer), after checking the ranks folded alike.

        The first column holds ``parameters``; a reducer whose ranks must fold the same streams
        in the same order passes the order's code there instead (see :class:`ShardedFoldReducer`).
        """
        k = len(counts.micro_batches)
        given = -1.0 if counts.tokens_given is None else float(counts.tokens_given)
        values = [float(parameters), float(elements), given, float(counts.last_stream),
                  *map(float, counts.micro_batches), *map(float, counts.norm_counts), *counts.tokens]
        local = torch.tensor(values, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).tolist()
        if any(row[: 4 + k] != table[0][: 4 + k] for row in table):
            rows = "; ".join(
                f"rank {r}: {self.first_column} {int(row[0])}, micro-batches "
                + ", ".join(f"stream {j}={int(n)}" for j, n in enumerate(row[4 : 4 + k]))
                + f", last stream {int(row[3]) if row[3] >= 0 else None}"
                for r, row in enumerate(table)
            )
            raise ValueError(
                "ranks folded different streams before step() (" + rows + "); " + self.agreement
            )
        return table

    agreement = ("every rank must fold the same number of micro-batches of each stream, end with a micro-batch "
                 "of the same stream (the one DDP syncs), and give tokens on all ranks or none")
    first_column = "parameters with gradients"

    @staticmethod
    def _column_sums(table: list[list[float]], start: int, count: int) -> list[float]:
        return [sum(row[start + j] for row in table) for j in range(count)]

    def reduce(self, counts: FoldCounts, stream_sums: list[list[Tensor]], noise_sums: Tensor | None) -> FoldCounts:
        """Average the stream sums and add up the counts; the noise sums are divided by
        ``world**2`` (each rank's micro-gradients are ``1/world`` of the averaged total's)."""
        k = len(counts.micro_batches)
        world = dist.get_world_size(self.group)
        buffers = stream_sums[0] if stream_sums else []
        table = self._agree(counts, len(buffers), sum(b.numel() for b in buffers))
        for sums in stream_sums:
            all_reduce_flat(sums, self.group, world, dtype=self.communication_dtype)
        if noise_sums is not None:
            all_reduce_flat([noise_sums], self.group, world * world)
        return replace(
            counts,
            micro_batches=[n * world for n in counts.micro_batches],
            norm_counts=[int(n) for n in self._column_sums(table, 4 + k, k)],
            tokens=self._column_sums(table, 4 + 2 * k, k),
        )

    def total(self, tensors: Sequence[Tensor]) -> None:
        """Nothing to add up: every replica holds every parameter, so its sums are already global."""

    def any(self, flags: Tensor) -> Tensor:
        flags = flags.to(self.device).clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags


class ShardedFoldReducer(DDPFoldReducer):
    """The folds of fully sharded parameters (FSDP2, HSDP), synced after every micro-batch.

    FSDP2 averages every micro-batch's gradient over the ranks before the fold, so a fold is of
    the ranks' joint micro-batch: the stream sums are already global and are not averaged, the
    micro-batch counts are not multiplied, and the tokens are added up over the ranks. The ranks
    must fold the same streams in the same order (a joint micro-batch of two streams would mix
    them), which the descriptor checks through the order's code. The noise sums and every other
    partial sum (:meth:`total`) are sums over parameter rows and are added up over the group.
    """

    agreement = ("under FSDP2 every micro-batch's gradient is averaged over the ranks, so every rank must fold "
                 "the same stream at the same micro-batch (e.g. mlfop.StreamBatchSampler gives every rank the "
                 "same stream sequence), and give tokens on all ranks or none")
    first_column = "fold order code"

    syncs_every_fold = True

    def reduce(self, counts: FoldCounts, stream_sums: list[list[Tensor]], noise_sums: Tensor | None) -> FoldCounts:
        k = len(counts.micro_batches)
        table = self._agree(counts, counts.order_code, 0)
        if noise_sums is not None:
            self.total([noise_sums])
        return replace(counts, tokens=self._column_sums(table, 4 + 2 * k, k))

    def total(self, tensors: Sequence[Tensor]) -> None:
        """Add up the ranks' partial sums in place."""
        all_reduce_flat(tensors, self.group, 1.0, self.device)


class RefreshSharding:
    r"""The eigenbasis refresh of replicated blocks (DDP), each block on one rank of ``group``.

    A refresh (one power-iteration step and a QR per rotated dimension, :math:`O(d^3)`) is the
    same work on every replica. Here block :math:`b` of the :math:`n`-th refreshed stack is
    refreshed by rank :math:`(n + b) \bmod W` only; each rank fills in its blocks' new bases,
    orders and failure counts, and one all-reduce (a sum with the other ranks' zeros, which is
    exact) gives every rank all of them. The refresh work divides by the world size at the cost
    of an all-reduce of the stacked bases; the results are those of :func:`power_iteration_basis`
    on every block, as one process computes them.
    """

    def __init__(self, group, device: torch.device) -> None:
        self.group = group
        self.device = device
        self._calls = 0  # the rotating start, the same on every rank (the calls come in one order)

    def __call__(self, factors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, int]:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        blocks, size = bases.shape[0], bases.shape[-1]
        mine = torch.tensor([b for b in range(blocks) if (self._calls + b) % world == rank], dtype=torch.long,
                            device=bases.device)
        self._calls += blocks
        new_bases = torch.zeros_like(bases)
        order = torch.zeros(blocks, size, dtype=bases.dtype, device=bases.device)  # exact up to 2**24 in float32
        failures = torch.zeros(1, dtype=bases.dtype, device=bases.device)
        if mine.numel():
            own_bases, own_order, own_failures = power_iteration_basis(factors[mine], bases[mine])
            new_bases[mine] = own_bases
            order[mine] = own_order.to(bases.dtype)
            failures += own_failures
        all_reduce_flat([new_bases, order, failures], self.group, 1.0, self.device)
        return new_bases, order.long(), int(failures.item())  # (one read, on refresh steps only)


class LocalMicroNorms:
    """Hooks that keep each rank's micro-gradient norms for the noise estimate under DDP.

    DDP replaces the synced micro-batch's accumulated gradient by the ranks' average at the end
    of its backward, so a fold after it cannot see what this rank's micro-batch added. A
    post-accumulate-grad hook on every parameter runs right after the rank's own gradient is
    accumulated, before DDP writes the average back, and records the squared norm of what was
    added since the last fold (:meth:`mlfop.folding.StreamFolds.record_local_micro`, found
    through ``folds()`` at call time, so the hooks keep no optimizer alive). With it the synced
    micro-batch is a sample like the others, and the noise estimate equals one process's on the
    global batch. The cost: one subtraction and norm per parameter and micro-batch, as the
    fold's own; the hooks stay on the parameters until :meth:`remove` (which the optimizer
    calls when it is collected).
    """

    def __init__(self, params: Sequence[Tensor], folds: Callable[[], object | None]) -> None:
        def record(param: Tensor) -> None:
            target = folds()
            if target is not None:
                target.record_local_micro(param)

        self._handles = [p.register_post_accumulate_grad_hook(record) for p in params if p.requires_grad]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DualGradientGroups:
    r"""FOP's dual-gradient groups for untagged large-batch training under DDP.

    The even and the odd ranks form two groups, and each group's share of the batch is one
    sub-batch stream: with :math:`W` ranks holding local gradients :math:`g_r` (their sum over
    the step's micro-batches),

    .. math::
        S_{\text{even}} = \tfrac{1}{W} \textstyle\sum_{r \text{ even}} g_r, \quad
        S_{\text{odd}} = \tfrac{1}{W} \textstyle\sum_{r \text{ odd}} g_r, \quad
        S_{\text{even}} + S_{\text{odd}} = \bar g \;(\text{DDP's average}),

    exactly the streams one process would fold from the two halves of the batch. A DDP
    communication hook (:meth:`hook`, installed by :meth:`register`) replaces DDP's all-reduce of
    each bucket on the synced micro-batch by one all-reduce of a ``(2, n)`` buffer holding the
    rank's gradient in its group's row and zeros in the other: every rank gets both groups' sums,
    bit for bit the same, and DDP writes their sum, averaged, back to ``p.grad`` as usual (so
    clipping and logging see the averaged gradient). No fold is needed: the optimizer takes the
    two streams from the hook. Bytes: twice DDP's own all-reduce of the gradient (the second
    stream), in one collective.
    """

    def __init__(self, optimizer, group=None) -> None:
        group = group if group is not None else default_process_group()
        world = 1 if group is None else dist.get_world_size(group)
        if world < 2 or world % 2:
            raise ValueError(
                f"dual-gradient groups need an even number of data-parallel ranks (at least 2), got {world}; "
                f"run with an even world size, or fold the micro-batches (opt.fold()) instead"
            )
        if tuple(optimizer.streams) != ("even", "odd"):
            raise ValueError(
                "dual-gradient groups give the untagged sub-batch streams: build the optimizer with streams=None "
                f"(it has streams={list(optimizer.streams)})"
            )
        self.world, self.group = world, group
        self.parity = dist.get_rank(group) % 2
        self._record = optimizer.record_dual_gradient

    def register(self, ddp) -> None:
        """Install the hook on a ``DistributedDataParallel`` model."""
        ddp.register_comm_hook(None, self.hook)

    def hook(self, state, bucket):  # (no return annotation: DDP checks it against an evaluated one)
        """DDP's bucket reduction, with the two groups' sums kept for the optimizer; returns a
        completed future of the averaged bucket."""
        local = bucket.buffer()
        both = torch.zeros((2, local.numel()), dtype=local.dtype, device=local.device)
        both[self.parity] = local
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.group)
        both.div_(self.world)
        gradients = bucket.gradients()
        sizes = [g.numel() for g in gradients]
        self._record(bucket.parameters(), [piece.view(2, *g.shape) for piece, g in zip(both.split(sizes, dim=1), gradients)])
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(both[0] + both[1])
        return future
