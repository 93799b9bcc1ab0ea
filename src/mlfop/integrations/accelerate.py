"""ML-FOP-SOAP in an ``accelerate`` gradient-accumulation loop.

A user's ``with accelerator.accumulate(model):`` loop changes in two lines: take the stream out
of the batch before the forward, and fold after ``accelerator.backward``::

    from mlfop.data import StreamBatchSampler, stream_column
    from mlfop.integrations.accelerate import StreamFolding, prepare_stream_loader

    accelerator = Accelerator(gradient_accumulation_steps=4)
    sampler = StreamBatchSampler(stream_column(dataset), 8, accumulation_steps=4)   # mlfop
    loader = prepare_stream_loader(accelerator, DataLoader(dataset, batch_sampler=sampler))  # mlfop
    optimizer = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text"))
    model, optimizer = accelerator.prepare(model, optimizer)
    folding = StreamFolding(optimizer)                    # mlfop
    for batch in loader:
        with accelerator.accumulate(model):
            stream = folding.pop_stream(batch)            # mlfop: batch["stream"], removed
            loss = model(**batch).loss
            accelerator.backward(loss)
            folding.fold(stream)                          # mlfop
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

The sampler makes single-stream micro-batches out of a mixed dataset, in the data's stream
proportions in every accumulation, with the same stream sequence on every process (it reads the
ranks from ``torch.distributed``, which ``Accelerator()`` initialises). Call
``sampler.set_epoch(epoch)`` before each epoch. :func:`prepare_stream_loader` keeps accelerate
from dealing its micro-batches out to the processes a second time.

Why this is correct under accelerate's bookkeeping:

- ``accelerator.backward`` divides every micro-batch's loss by the same N: a global factor that
  the folds' natural shares (micro-batch or token counts) do not see.
- ``AcceleratedOptimizer.step()`` and ``.zero_grad()`` do nothing until ``sync_gradients``, so
  between micro-batches neither ``p.grad`` nor the folds are reset; the real ``step()`` sees
  every fold of the accumulation, and the real ``zero_grad()`` after it forgets them.
  (Call ``optimizer.zero_grad()`` after ``step()``, as accelerate's examples do, not at the
  top of the loop body: at the synced micro-batch that would drop the accumulation, folds
  included, for any optimizer.)
- ``p.grad`` keeps the total (see :mod:`mlfop.folding`), so ``accelerator.clip_grad_norm_``
  returns the accumulated gradient's norm and its rescale reaches ``step()`` (a global factor,
  which ``step()`` recovers). Under DDP, ``accumulate`` skips the sync on all micro-batches but
  the last, which is what ``MLFOPSOAP`` expects.
- ``accelerator.save_state()`` saves ``optimizer.state_dict()``, which ``MLFOPSOAP`` refuses
  between a fold and the step: save after ``optimizer.zero_grad()`` of a synced micro-batch
  (``if accelerator.sync_gradients: ...``), where nothing is pending.

``Accelerator(mixed_precision="bf16")`` is tested on CPU; ``"fp16"`` with accelerate's GradScaler
relies on the same ``p.grad`` total (``unscale_`` is a global factor, an inf anywhere stays in
the total) but is not tested here.

``tokens=`` of :meth:`StreamFolding.fold` is the micro-batch's loss-token count: give it when
the loss is a token sum divided by the step's tokens (then each stream's gradient is its
per-token mean), or leave it out when each micro-batch's loss is a mean (streams are then
weighted by micro-batches). :func:`loss_tokens` counts them from the labels.

This module needs no import of ``accelerate`` itself: it reaches the optimizer through the
wrapper's ``.optimizer``. ``import mlfop`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from mlfop.data import StreamBatchSampler
from mlfop.integrations.batch_streams import StreamKey, loss_tokens, unwrap_optimizer

__all__ = ["StreamFolding", "fold_after_backward", "loss_tokens", "prepare_stream_loader", "unwrap_optimizer"]


_HINT = "build the optimizer as mlfop.MLFOPSOAP(...) before accelerator.prepare(...)"


def fold_after_backward(optimizer: Any, stream: str | None, tokens: float | torch.Tensor | None = None) -> None:
    """Fold the micro-batch that ``accelerator.backward`` just added into ``stream``.

    ``optimizer`` may be the ``AcceleratedOptimizer`` that ``accelerator.prepare`` returned.
    """
    unwrap_optimizer(optimizer, _HINT).fold(stream, tokens=tokens)


def prepare_stream_loader(accelerator: Any, loader: torch.utils.data.DataLoader) -> Any:
    """``accelerator.prepare(loader)`` for a loader whose ``batch_sampler`` is a
    :class:`mlfop.data.StreamBatchSampler`.

    The sampler already gives each rank its own micro-batches (every rank the same streams), so
    the batch-sampler shard that ``prepare`` adds in a multi-process run, which would deal the
    micro-batches round-robin, is made a passthrough (as transformers' Trainer does for its own
    rank-aware batch sampler). Refused where the sampler's ranks are not accelerate's, or where
    accelerate would not iterate the sampler on every rank (``dispatch_batches=True``).
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, StreamBatchSampler):
        raise TypeError(f"the loader's batch_sampler must be a mlfop.data.StreamBatchSampler, got {type(sampler).__name__}")
    ranks = (accelerator.num_processes, accelerator.process_index)
    if (sampler.num_replicas, sampler.rank) != ranks:
        raise ValueError(
            f"the StreamBatchSampler is built for rank {sampler.rank} of {sampler.num_replicas}, but this is process "
            f"{ranks[1]} of {ranks[0]}: build it after Accelerator(...), or with num_replicas=accelerator.num_processes "
            f"and rank=accelerator.process_index"
        )
    prepared = accelerator.prepare(loader)
    shard = getattr(prepared, "batch_sampler", None)
    if shard is not sampler:
        if getattr(shard, "batch_sampler", None) is not sampler or not hasattr(shard, "num_processes"):
            raise ValueError(
                f"accelerate does not iterate the StreamBatchSampler on every rank (it prepared a "
                f"{type(prepared).__name__}); use DataLoaderConfiguration(dispatch_batches=False)"
            )
        shard.num_processes, shard.process_index = 1, 0
    return prepared


class StreamFolding:
    """Reads each micro-batch's stream and folds it into ``MLFOPSOAP`` after ``accelerator.backward``.

    Args:
        optimizer: ``MLFOPSOAP``, or the ``AcceleratedOptimizer`` wrapping it.
        stream_key (str or None): the batch key that names the stream (default: ``"stream"``).
            ``None``: untagged run (the optimizer must have ``streams=None``); micro-batches
            alternate between its two sub-batch streams.
        stream_names (Mapping or Sequence or None): maps the key's values to stream names:
            ``{value: name}`` or a sequence indexed by integer ids. ``None``: values are names,
            or integer ids into the optimizer's ``streams``.

    The key's value may be a name or id, a list of them (as a default collate makes of a
    string field) or a tensor of ids; all values of one micro-batch must agree.
    """

    def __init__(
        self,
        optimizer: Any,
        stream_key: str | None = "stream",
        stream_names: Mapping[Any, str] | Sequence[str] | None = None,
    ) -> None:
        self.key = StreamKey(stream_key, stream_names, who="StreamFolding")
        self.optimizer = unwrap_optimizer(optimizer, _HINT)
        self.stream_key = stream_key
        self.key.check_optimizer(self.optimizer.streams)

    def stream_of(self, batch: Mapping[str, Any]) -> str | None:
        """The optimizer's stream name for ``batch`` (``None`` in an untagged run)."""
        return self.key.stream_of(batch, self.optimizer.streams)

    def pop_stream(self, batch: MutableMapping[str, Any]) -> str | None:
        """:meth:`stream_of`, and remove the key from ``batch`` (so ``model(**batch)`` works)."""
        name = self.stream_of(batch)
        if self.stream_key is not None:
            batch.pop(self.stream_key, None)
        return name

    def fold(self, stream: str | None, tokens: float | torch.Tensor | None = None) -> None:
        """Fold the micro-batch just back-propagated (call right after ``accelerator.backward``)."""
        self.optimizer.fold(stream, tokens=tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.optimizer).__name__}, stream_key={self.stream_key!r})"
