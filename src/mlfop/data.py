r"""Single-stream micro-batches from a dataset that mixes streams.

:meth:`mlfop.MLFOPSOAP.fold` takes one stream per micro-batch. :class:`StreamBatchSampler`
makes such micro-batches out of a mixed dataset (text-to-image, image-to-text and text-only
examples side by side), so that every optimizer step sees the streams in the data's
proportions, and every data-parallel rank folds the same stream sequence::

    streams = mlfop.data.stream_column(dataset)            # one stream value per example
    sampler = mlfop.data.StreamBatchSampler(streams, micro_batch_size=8, accumulation_steps=4)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=...)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for j, batch in enumerate(loader):
            ...backward...; opt.fold(batch["stream"][0])
            if (j + 1) % 4 == 0: opt.step(); opt.zero_grad()

A micro-batch that mixes streams inside one sequence (Emu3-style interleaved text and image
tokens) is the other route: :func:`mlfop.mixed_batches.fold_losses`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["StreamBatchSampler", "plain_value", "stream_column"]


def plain_value(value: Any) -> Any:
    """A stream value as a plain Python object (a 0-d tensor or numpy scalar becomes its item)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a stream value must be a single name or id, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return value


def stream_column(dataset: Any, column: str = "stream") -> list[Any]:
    """The stream of every example of ``dataset``, read from its column ``column``.

    ``dataset`` is a Hugging Face ``datasets.Dataset`` (the column is read on its own, without
    decoding the other columns) or any map-style dataset of mappings, such as a list of dicts
    (each example is indexed once). Raises ``KeyError`` naming the column when it is missing.
    """
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, (list, tuple)):
        if column not in columns:
            raise KeyError(f"the dataset has no {column!r} column (it has {list(columns)}); name the stream column")
        return [plain_value(value) for value in dataset[column]]
    values = []
    for i in range(len(dataset)):
        example = dataset[i]
        if not isinstance(example, Mapping) or column not in example:
            found = sorted(map(str, example)) if isinstance(example, Mapping) else type(example).__name__
            raise KeyError(f"example {i} of the dataset has no {column!r} key (it has {found}); name the stream column")
        values.append(plain_value(example[column]))
    return values


def window_counts(slots: Sequence[int], window: int) -> list[list[int]]:
    """How many of each stream's ``slots`` go into each window of ``window`` consecutive ones.

    A full window gives stream k ``floor`` or ``ceil`` of ``window * m_k / M`` (``m_k`` its
    slots, ``M`` their sum): the floors, plus one more for the streams that lag furthest behind
    their running target ``t * m_k / M`` (ties: the larger stream first). The last window,
    shorter when ``window`` does not divide ``M``, takes what is left.
    """
    total = sum(slots)
    placed = [0] * len(slots)
    windows = []
    for end in range(window, total + window, window):
        if end <= total:
            counts = [window * m // total for m in slots]
            left = [k for k in range(len(slots)) if placed[k] + counts[k] < slots[k]]
            lag = sorted(left, key=lambda k: ((placed[k] + counts[k]) * total - end * slots[k], -slots[k], k))
            for k in lag[: window - sum(counts)]:
                counts[k] += 1
        else:
            counts = [m - p for m, p in zip(slots, placed)]
        placed = [p + c for p, c in zip(placed, counts)]
        windows.append(counts)
    return windows


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class StreamBatchSampler(Sampler[list[int]]):
    r"""Micro-batches of one stream each, in the streams' proportions in every optimizer step.

    With ``B = micro_batch_size``, ``A = accumulation_steps`` and ``R = num_replicas``, each
    epoch ``e``:

    1. each stream's examples are shuffled (``shuffle=True``, generator seeded with
       ``seed + e``) and cut into *global micro-batches* of ``B * R`` indices; rank ``r`` takes
       the ``r``-th of the ``R`` equal parts of each (``B`` indices);
    2. the global micro-batches are laid out in windows of ``A``, one optimizer step each:
       with ``m_k`` global micro-batches of stream ``k`` out of ``M``, a full window holds
       ``floor`` or ``ceil`` of ``A * m_k / M`` of stream ``k`` (the streams furthest behind
       their running share ``t * m_k / M`` get the ``ceil``); inside a window the order is
       shuffled (stream by stream with ``shuffle=False``).

    So every rank yields the same streams in the same order over disjoint examples (the
    ranks' folds agree, and the synced last micro-batch of a step has the same stream
    everywhere), and the window composition does not depend on the seed. ``len()`` is the
    number of micro-batches per rank and epoch.

    Each example is used once per epoch, with two exceptions at the end of a stream (``n_k``
    examples). ``drop_last=False`` completes a stream to a multiple of ``R`` by repeating its
    first examples of the epoch (fewer than ``R``, as ``DistributedSampler`` pads), and its last
    micro-batch may be shorter than ``B``, equally on every rank. ``drop_last=True`` leaves out
    each stream's last ``n_k mod (B * R)`` examples of the epoch, so every micro-batch has ``B``.

    Args:
        streams (Sequence): the stream of each example: names, ids, anything hashable
            (:func:`stream_column` reads it from a dataset). Streams keep their first-seen order.
        micro_batch_size (int): examples per micro-batch on each rank.
        accumulation_steps (int): micro-batches per optimizer step on each rank, the loop's
            gradient accumulation (Trainer's ``gradient_accumulation_steps``): the window in
            which the proportions are kept. Default 1: in every prefix.
        num_replicas (int or None): data-parallel ranks; default: ``torch.distributed``'s
            world size when it is initialised, else 1.
        rank (int or None): this rank; default: ``torch.distributed``'s rank, else 0.
        seed (int): the shuffling seed, the same on every rank.
        shuffle (bool): shuffle each stream's examples and each window's order.
        drop_last (bool): see above.

    It is a batch sampler: ``DataLoader(dataset, batch_sampler=sampler)``. ``set_epoch(e)``
    before each epoch gives a new order, as for ``DistributedSampler``. ``state_dict()`` holds
    the epoch and how many micro-batches this epoch's iteration has handed out;
    ``load_state_dict()`` makes the next iteration continue from there with the same
    micro-batches. A ``DataLoader`` with ``num_workers > 0`` asks for micro-batches ahead of
    the training loop, so save ``{"epoch": e, "position": micro_batches_trained}`` in that case.
    """

    def __init__(
        self,
        streams: Sequence[Hashable],
        micro_batch_size: int,
        *,
        accumulation_steps: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if isinstance(streams, (str, bytes)) or not isinstance(streams, Sequence):
            raise TypeError(
                f"streams must be a sequence with one stream per example, got {type(streams).__name__}; "
                f"read it from a dataset with mlfop.data.stream_column(dataset)"
            )
        values = [plain_value(value) for value in streams]
        if not values:
            raise ValueError("streams is empty: the dataset has no examples")
        try:
            names = list(dict.fromkeys(values))
        except TypeError:
            raise TypeError("every stream value must be hashable (a name or an integer id)") from None
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.accumulation_steps = _positive_int("accumulation_steps", accumulation_steps)
        world = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if world else 1
        if rank is None:
            rank = dist.get_rank() if world else 0
        self.num_replicas = _positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, num_replicas={num_replicas}), got {rank!r}")
        self.rank = rank
        for flag, value in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        index = {name: k for k, name in enumerate(names)}
        members: list[list[int]] = [[] for _ in names]
        for i, value in enumerate(values):
            members[index[value]].append(i)
        self.stream_values = tuple(names)
        self._members = [torch.tensor(m, dtype=torch.long) for m in members]
        span = self.micro_batch_size * self.num_replicas
        if drop_last:
            self._slots = [len(m) // span for m in members]
        else:
            self._slots = [math.ceil(len(m) / span) for m in members]
        if not any(self._slots):
            raise ValueError(
                f"drop_last=True leaves no micro-batch: no stream has micro_batch_size * num_replicas = {span} "
                f"examples (counts {dict(zip(names, map(len, members)))}); use drop_last=False or a smaller micro-batch"
            )
        self._windows = window_counts(self._slots, self.accumulation_steps)
        self.epoch = 0
        self._position = 0  # micro-batches handed out by this epoch's iteration
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)

    def __len__(self) -> int:
        return sum(self._slots)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order; a new epoch starts from its first micro-batch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self._position, self._resume_at = epoch, 0, 0

    def micro_batches(self) -> list[tuple[Hashable, list[int]]]:
        """This rank's ``(stream, indices)`` of the whole current epoch, in order."""
        span = self.micro_batch_size * self.num_replicas
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        orders = []
        for members, slots in zip(self._members, self._slots):
            order = members[torch.randperm(len(members), generator=generator)] if self.shuffle else members
            if self.drop_last:
                order = order[: slots * span]
            elif len(order) % self.num_replicas:
                pad = self.num_replicas - len(order) % self.num_replicas
                order = torch.cat([order, order.repeat(math.ceil(pad / len(order)))[:pad]])
            orders.append(order)
        taken = [0] * len(orders)
        out = []
        for counts in self._windows:
            window = [k for k, count in enumerate(counts) for _ in range(count)]
            if self.shuffle:
                window = [window[i] for i in torch.randperm(len(window), generator=generator).tolist()]
            for k in window:
                chunk = orders[k][taken[k] * span : (taken[k] + 1) * span]
                taken[k] += 1
                part = len(chunk) // self.num_replicas
                out.append((self.stream_values[k], chunk[self.rank * part : (self.rank + 1) * part].tolist()))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for _, indices in self.micro_batches()[start:]:
            self._position += 1
            yield indices

    # ------------------------------------------------------------------ resume
    def _fingerprint(self) -> dict[str, Any]:
        """What decides the micro-batches: a resume must match it."""
        return {
            "stream_counts": [len(m) for m in self._members],
            "micro_batch_size": self.micro_batch_size,
            "accumulation_steps": self.accumulation_steps,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the position in it, and the configuration (plain values only)."""
        return {"epoch": self.epoch, "position": self._position, **self._fingerprint()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from ``state_dict``: the next iteration yields that epoch's remaining micro-batches."""
        differs = {key: (state_dict[key], value) for key, value in self._fingerprint().items()
                   if key in state_dict and state_dict[key] != value}
        if differs:
            detail = ", ".join(f"{key}: saved {saved!r}, here {here!r}" for key, (saved, here) in differs.items())
            raise ValueError(
                f"the sampler state was saved with another configuration ({detail}); a resume with it would not "
                f"see the same remaining micro-batches: build the sampler as it was saved"
            )
        epoch, position = state_dict["epoch"], state_dict["position"]
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= len(self):
            raise ValueError(f"position must be an integer in [0, {len(self)}], got {position!r}")
        self.set_epoch(epoch)
        self._position = self._resume_at = position

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(streams={list(self.stream_values)}, micro_batch_size={self.micro_batch_size}, "
            f"accumulation_steps={self.accumulation_steps}, num_replicas={self.num_replicas}, rank={self.rank}, "
            f"seed={self.seed}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )
