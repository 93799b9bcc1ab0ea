"""Data parallelism for the stream folds: agree across ranks, then average the stream sums.

Under DDP each rank folds its own micro-batches (with ``no_sync()`` on all but the last, so
that DDP itself averages the total in ``p.grad``). At ``step()`` every rank first exchanges a
small descriptor of its folds; if the ranks disagree (a stream folded on some ranks only,
different micro-batch counts, different parameters with gradients) every rank raises the same
``ValueError`` instead of hanging in a mismatched collective. Then each stream's buffers are
averaged over the ranks, one flat bucket per stream, and the token counts are summed. After
that every rank holds the same stream sums and takes the same step as a single process that
saw the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mlfop.folding import StreamFolds

__all__ = ["default_process_group", "all_reduce_folds"]


def default_process_group():
    """The world group when ``torch.distributed`` runs with more than one rank, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _descriptor(folds: StreamFolds, params: list[Tensor]) -> Tensor:
    numel = sum(folds.buffers[p][0].numel() for p in params)
    given = -1.0 if folds.tokens_given is None else float(folds.tokens_given)
    values = [float(len(params)), float(numel), given, float(folds.last_stream),
              *map(float, folds.micro_batches), *map(float, folds.norm_counts), *folds.tokens]
    return torch.tensor(values, dtype=torch.float64)


def all_reduce_folds(folds: StreamFolds, params: list[Tensor], group) -> None:
    """Check that all ranks folded alike, then average the stream sums and add up the tokens.

    ``params`` lists, in the same order on every rank, the parameters whose buffers to reduce.
    """
    k = len(folds.names)
    world = dist.get_world_size(group)
    local = _descriptor(folds, params)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)
    agree = table[:, : 4 + k]
    if not bool((agree == agree[0]).all()):
        rows = "; ".join(
            f"rank {r}: {int(row[0])} parameters, micro-batches "
            + ", ".join(f"{name}={int(n)}" for name, n in zip(folds.names, row[4 : 4 + k].tolist()))
            + f", last {folds.names[int(row[3])] if row[3] >= 0 else None}"
            for r, row in enumerate(agree)
        )
        raise ValueError(
            "ranks folded different streams before step() (" + rows + "); every rank must fold the "
            "same number of micro-batches of each stream, end with a micro-batch of the same stream "
            "(the one DDP syncs), and give tokens on all ranks or none"
        )
    folds.norm_counts = table[:, 4 + k : 4 + 2 * k].sum(dim=0).long().tolist()
    folds.tokens = table[:, 4 + 2 * k :].sum(dim=0).tolist()
    for stream in folds.present():
        flat = torch.cat([folds.buffers[p][stream].reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for p in params:
            view = folds.buffers[p][stream]
            view.copy_(flat[offset : offset + view.numel()].view_as(view))
            offset += view.numel()
    if folds.track_norms:
        for p in params:  # a parameter seen only by a dropped (synced) fold has no sums yet
            groups = folds.head_layouts[p][0] if p in folds.head_layouts else 1
            folds.micro_sq.setdefault(p, torch.zeros(k, groups, dtype=torch.float64))
        flat = torch.cat([folds.micro_sq[p].reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world * world)  # each rank's micro-gradients are 1/world of the averaged total's
        offset = 0
        for p in params:
            view = folds.micro_sq[p]
            view.copy_(flat[offset : offset + view.numel()].view_as(view))
            offset += view.numel()
    folds.micro_batches = [n * world for n in folds.micro_batches]
