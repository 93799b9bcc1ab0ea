r"""Owner-rank preconditioning of fully sharded parameters (FSDP2's ``fully_shard``, HSDP).

Under FSDP2 a parameter is a ``DTensor`` sharded by rows (``Shard(0)``) over a mesh dimension,
and ``p.grad`` is its sharded, already averaged gradient. SOAP's Kronecker factors need the whole
matrix, so preconditioning a shard by itself would change the algorithm with the world size.
Here every parameter gets an **owner**: one rank of its shard group, chosen once by a greedy
balance of the preconditioner's cost (largest first, to the least loaded rank):

.. math::
    \text{cost}(p) = \operatorname{numel}(p) \textstyle\sum_{i \in \text{rotated}} d_i
        + \sum_{i \in \text{rotated}} d_i^3

(two rotations a step, and an eigen/QR refresh). At ``step()`` one ``all_to_all`` brings each
owner the full gradient, the full parameter and any per-parameter extras (ML-FOP-SOAP's stream
sums) of the parameters it owns; the owner runs the whole single-process step on them
(statistics, rotations, the Fisher-orthogonal combination, SOAP's update and refresh), and a
second ``all_to_all`` sends each rank the rows of the updated parameters it holds. The state of
a parameter lives on its owner only, as plain full-size tensors (other ranks keep an empty
entry), so memory and preconditioner work divide by the shard group's size.

Scalars that a single process sums over all parameters (the rescale check, the global level's
totals, the finite check) are partial sums on each owner and are added up over the shard group
(:class:`~mlfop.distributed.ShardedFoldReducer`). Under HSDP (a ``(replicate, shard)`` mesh) each replica group
does the same work on the same data, so nothing crosses the replicate dimension.

Every tensor that enters a collective lives on the parameters' device (CUDA for NCCL), in the
tensor's own dtype (one ``all_to_all`` per dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_sharded", "local_tensor", "ShardLayout", "OwnerSharding"]

try:  # public from torch 2.5 on
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Replicate, Shard


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient of ``fully_shard``)."""
    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's piece of a ``DTensor`` (a view sharing its storage), else ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _rows_per_rank(rows: int, world: int) -> list[int]:
    """Rows of each rank under ``Shard(0)``: ``torch.chunk``'s split, padded with empty pieces."""
    sizes = [len(piece) for piece in torch.arange(rows).chunk(world)] if rows else []
    return sizes + [0] * (world - len(sizes))


@dataclass(frozen=True)
class ShardLayout:
    """Where a dim-0-sharded parameter's rows live: the shard group and each rank's row count."""

    group: Any
    world: int
    rank: int
    rows: tuple[int, ...]  # rows held by each rank of the group

    @property
    def offset(self) -> int:
        """The first row of this rank's piece."""
        return sum(self.rows[: self.rank])

    @classmethod
    def of(cls, param: Tensor, owner: str) -> ShardLayout:
        """The layout of ``param``; refuses placements other than one ``Shard(0)`` and ``Replicate``."""
        placements = tuple(param.placements)
        sharded = [d for d, placement in enumerate(placements) if isinstance(placement, Shard)]
        others_replicated = all(isinstance(p, (Shard, Replicate)) for p in placements)
        if len(sharded) != 1 or placements[sharded[0]] != Shard(0) or not others_replicated or param.dim() == 0:
            raise ValueError(
                f"{owner} supports DTensor parameters sharded by rows over one mesh dimension and "
                f"replicated over the others (FSDP2's fully_shard, HSDP), got placements {placements} "
                f"for a parameter of shape {tuple(param.shape)}; use fully_shard's default Shard(0) "
                f"placement (tensor parallelism is not supported)"
            )
        mesh, dim = param.device_mesh, sharded[0]
        layout = cls(mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim),
                     tuple(_rows_per_rank(param.shape[0], mesh.size(dim))))
        if param.to_local().shape[0] != layout.rows[layout.rank]:
            raise ValueError(
                f"{owner}: a parameter of shape {tuple(param.shape)} holds {param.to_local().shape[0]} rows "
                f"on this rank where Shard(0) gives {layout.rows[layout.rank]}; only even (torch.chunk) row "
                f"sharding, as fully_shard makes it, is supported"
            )
        return layout


def _exchange(send: list[list[Tensor]], receive: list[list[tuple[tuple[int, ...], torch.dtype]]], group,
              device: torch.device) -> list[list[Tensor]]:
    """One ``all_to_all`` per dtype: ``send[r]`` goes to rank ``r``; ``receive[s]`` describes what
    comes from rank ``s`` (shapes and dtypes, in order). Returns the received tensors per source."""
    dtypes = sorted({t.dtype for tensors in send for t in tensors} | {d for specs in receive for _, d in specs},
                    key=str)
    received: list[list[Tensor | None]] = [[None] * len(specs) for specs in receive]
    for dtype in dtypes:
        outgoing = [[t.reshape(-1) for t in tensors if t.dtype == dtype] for tensors in send]
        incoming = [[(i, shape) for i, (shape, d) in enumerate(specs) if d == dtype] for specs in receive]
        in_sizes = [sum(t.numel() for t in tensors) for tensors in outgoing]
        out_sizes = [sum(math.prod(shape) for _, shape in specs) for specs in incoming]
        flat_in = torch.cat([t for tensors in outgoing for t in tensors]) if sum(in_sizes) else torch.empty(
            0, dtype=dtype, device=device)
        flat_out = torch.empty(sum(out_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(flat_out, flat_in.to(device), output_split_sizes=out_sizes,
                               input_split_sizes=in_sizes, group=group)
        for source, (piece, specs) in enumerate(zip(flat_out.split(out_sizes), incoming)):
            for (i, shape), chunk in zip(specs, piece.split([math.prod(s) for _, s in specs])):
                received[source][i] = chunk.view(shape)
    return received  # type: ignore[return-value]


class OwnerSharding:
    """The owners of a set of sharded parameters, and the two exchanges of a step.

    ``cost(param)`` gives each parameter's preconditioner cost; all parameters must share one
    shard group. :meth:`gather` returns this rank's share of the step as full tensors,
    :meth:`scatter` writes the owners' updated parameters back into every rank's rows.
    """

    def __init__(self, params: Sequence[Tensor], cost: Callable[[Tensor], float], owner: str) -> None:
        self.layouts = {param: ShardLayout.of(param, owner) for param in params}
        first = next(iter(self.layouts.values()))
        if any(layout.group is not first.group for layout in self.layouts.values()):
            raise ValueError(
                f"{owner}: the sharded parameters live on different device meshes; build one optimizer "
                f"per mesh (or fully_shard the whole model over one mesh)"
            )
        self.group, self.world, self.rank = first.group, first.world, first.rank
        load = [0.0] * self.world
        self.owners: dict[Tensor, int] = {}
        ordered = sorted(range(len(params)), key=lambda i: (-cost(params[i]), i))
        for i in ordered:
            rank = min(range(self.world), key=lambda r: (load[r], r))
            self.owners[params[i]] = rank
            load[rank] += cost(params[i])
        self.device = local_tensor(params[0]).device

    def owns(self, param: Tensor) -> bool:
        return self.owners[param] == self.rank

    def gather(self, params: Sequence[Tensor], pieces: Sequence[Sequence[Tensor]]) -> dict[Tensor, list[Tensor]]:
        """Full tensors of the parameters this rank owns, from every rank's ``pieces``.

        ``pieces[i]`` are parameter ``i``'s local tensors: row pieces of shape
        ``(*lead, rows, *rest)`` with the same number ``lead`` of leading dimensions on every rank
        (0 for a gradient, 1 for a stack of stream sums); they come back as ``(*lead, n, *rest)``.
        """
        device = local_tensor(params[0]).device if params else torch.device("cpu")
        send: list[list[Tensor]] = [[] for _ in range(self.world)]
        receive: list[list[tuple[tuple[int, ...], torch.dtype]]] = [[] for _ in range(self.world)]
        owned = []
        for param, tensors in zip(params, pieces):
            owner = self.owners[param]
            send[owner] += [t.contiguous() for t in tensors]
            if owner == self.rank:
                owned.append((param, tensors))
                for source in range(self.world):
                    receive[source] += [(_with_rows(t.shape, self._lead(param, t), self.layouts[param].rows[source]),
                                         t.dtype) for t in tensors]
        received = _exchange(send, receive, self.group, device)
        full: dict[Tensor, list[Tensor]] = {}
        cursor = [0] * self.world
        for param, tensors in owned:
            gathered = []
            for t in tensors:
                parts = []
                for source in range(self.world):
                    parts.append(received[source][cursor[source]])
                    cursor[source] += 1
                gathered.append(torch.cat(parts, dim=self._lead(param, t)))
            full[param] = gathered
        return full

    def _lead(self, param: Tensor, piece: Tensor) -> int:
        return piece.dim() - param.dim()

    def scatter(self, params: Sequence[Tensor], updated: dict[Tensor, Tensor]) -> None:
        """Copy the owners' ``updated`` full parameters into every rank's rows of ``params``."""
        if not params:
            return
        send: list[list[Tensor]] = [[] for _ in range(self.world)]
        receive: list[list[tuple[tuple[int, ...], torch.dtype]]] = [[] for _ in range(self.world)]
        mine = []
        for param in params:
            layout, owner = self.layouts[param], self.owners[param]
            if owner == self.rank:
                for rank, piece in enumerate(updated[param].split(list(layout.rows), dim=0)):
                    send[rank].append(piece)
            receive[owner].append((tuple(local_tensor(param).shape), param.dtype))
            mine.append((owner, param))
        received = _exchange(send, receive, self.group, local_tensor(params[0]).device)
        cursor = [0] * self.world
        targets, values = [], []
        for owner, param in mine:
            targets.append(local_tensor(param))
            values.append(received[owner][cursor[owner]])
            cursor[owner] += 1
        torch._foreach_copy_(targets, values)


def _with_rows(shape: Sequence[int], lead: int, rows: int) -> tuple[int, ...]:
    shape = tuple(shape)
    return (*shape[:lead], rows, *shape[lead + 1:])
