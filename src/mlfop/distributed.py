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

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from mlfop.folding import FoldCounts

__all__ = ["default_process_group", "DDPFoldReducer"]


def default_process_group():
    """The world group when ``torch.distributed`` runs with more than one rank, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _all_reduce_flat(tensors: Sequence[Tensor], group, divisor: float) -> None:
    """Sum ``tensors`` over the ranks in one flat bucket, divide by ``divisor``, copy back."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(divisor)
    torch._foreach_copy_(list(tensors), [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


class DDPFoldReducer:
    """Average the folds of data-parallel replicas over ``group``."""

    def __init__(self, group, device: torch.device) -> None:
        self.group = group
        self.device = device

    def _agree(self, counts: FoldCounts, parameters: int, elements: int) -> Tensor:
        """All ranks' descriptors ``(world, 4 + 3K)``, after checking the ranks folded alike."""
        k = len(counts.micro_batches)
        given = -1.0 if counts.tokens_given is None else float(counts.tokens_given)
        values = [float(parameters), float(elements), given, float(counts.last_stream),
                  *map(float, counts.micro_batches), *map(float, counts.norm_counts), *counts.tokens]
        local = torch.tensor(values, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).cpu()
        agree = table[:, : 4 + k]
        if not bool((agree == agree[0]).all()):
            rows = "; ".join(
                f"rank {r}: {int(row[0])} parameters, micro-batches "
                + ", ".join(f"stream {j}={int(n)}" for j, n in enumerate(row[4 : 4 + k].tolist()))
                + f", last stream {int(row[3]) if row[3] >= 0 else None}"
                for r, row in enumerate(agree)
            )
            raise ValueError(
                "ranks folded different streams before step() (" + rows + "); every rank must fold the "
                "same number of micro-batches of each stream, end with a micro-batch of the same stream "
                "(the one DDP syncs), and give tokens on all ranks or none"
            )
        return table

    def reduce(self, counts: FoldCounts, stream_sums: list[list[Tensor]], noise_sums: Tensor | None) -> FoldCounts:
        """Average the stream sums and add up the counts; the noise sums are divided by
        ``world**2`` (each rank's micro-gradients are ``1/world`` of the averaged total's)."""
        k = len(counts.micro_batches)
        world = dist.get_world_size(self.group)
        buffers = stream_sums[0] if stream_sums else []
        table = self._agree(counts, len(buffers), sum(b.numel() for b in buffers))
        for sums in stream_sums:
            _all_reduce_flat(sums, self.group, world)
        if noise_sums is not None:
            _all_reduce_flat([noise_sums], self.group, world * world)
        return replace(
            counts,
            micro_batches=[n * world for n in counts.micro_batches],
            norm_counts=[int(n) for n in table[:, 4 + k : 4 + 2 * k].sum(dim=0).tolist()],
            tokens=table[:, 4 + 2 * k :].sum(dim=0).tolist(),
        )

    def any(self, flags: Tensor) -> Tensor:
        flags = flags.to(self.device).clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags
