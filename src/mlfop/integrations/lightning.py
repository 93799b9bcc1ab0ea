"""ML-FOP-SOAP in Lightning's automatic optimization: a callback that folds each micro-batch.

A user's script changes in three places: ``configure_optimizers`` returns :class:`mlfop.MLFOPSOAP`,
every batch carries its stream under a key (``"stream"`` by default), and the trainer gets the
callback::

    from mlfop.integrations.lightning import MLFOPFolding

    class LitModel(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss          # the callback already took "stream" out
        def configure_optimizers(self):
            return mlfop.MLFOPSOAP(self.parameters(), streams=("image", "text"))

    trainer = L.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0, callbacks=[MLFOPFolding()])

What :class:`MLFOPFolding` does, in Lightning's order of events:

- ``on_train_start`` and ``on_train_epoch_start``: sets the epoch of a
  :class:`mlfop.data.StreamBatchSampler` that batches the train dataloader (Lightning itself
  only reaches samplers, not batch samplers). The sampler is rank-aware itself: under DDP
  build the dataloader in ``train_dataloader()`` (after the process group exists) and pass
  ``Trainer(use_distributed_sampler=False)``.
- ``on_train_batch_start``: reads the stream of the batch (and its loss-token count, with
  ``tokens=``), and by default removes the key from a dict batch, so ``training_step`` and
  ``model(**batch)`` never see it.
- ``on_after_backward``: folds the micro-batch into its stream. It fires after every
  micro-batch's backward, including the last one, which Lightning runs inside
  ``optimizer.step(closure)`` (``MLFOPSOAP.step`` calls the closure), and before
  ``on_before_optimizer_step`` and the ``gradient_clip_val`` clipping. ``p.grad`` keeps the
  total, so clipping and the logged gradient norms see the accumulated gradient, and the clip
  factor is a global rescale that ``step()`` recovers. Lightning's division of the loss by
  ``accumulate_grad_batches`` is a global factor too.
- ``on_train_batch_end`` after an optimizer step: forgets the folds (``zero_grad``), also when
  the step was skipped (a non-finite gradient), so a ``ModelCheckpoint`` right after the step
  can save the optimizer. Lightning's own ``zero_grad`` at the start of each accumulation also
  resets them.

Resume from a Lightning checkpoint (``trainer.fit(..., ckpt_path=...)``) restores the optimizer
through ``MLFOPSOAP.load_state_dict`` and continues exactly. ``precision="bf16-mixed"`` is tested
on CPU; ``"16-mixed"`` with Lightning's GradScaler relies on the same ``p.grad`` total (the
unscale is a global factor) but is not tested here. Validation batches keep the stream key
(the callback only reads training batches): drop it in ``validation_step``. Manual optimization needs no
callback: call ``optimizer.fold(stream)`` after ``self.manual_backward(loss)``.

Importing this module imports ``lightning`` (or, failing that, ``pytorch_lightning``);
``import mlfop`` never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch

from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from mlfop.data import StreamBatchSampler
from mlfop.integrations.batch_streams import StreamKey, unwrap_optimizer

__all__ = ["MLFOPFolding"]


class MLFOPFolding(Callback):
    """Lightning callback: folds every micro-batch into its stream of :class:`mlfop.MLFOPSOAP`.

    Args:
        stream_key (str or None): the batch key that names the micro-batch's stream (default:
            ``"stream"``); the batch must be a mapping. ``None``: untagged run (the optimizer
            has ``streams=None``), micro-batches alternate between its two sub-batch streams.
        stream_names (Mapping or Sequence or None): maps the key's values to stream names:
            ``{value: name}``, or a sequence indexed by integer ids. ``None``: values are
            names, or integer ids into the optimizer's ``streams``.
        tokens (Callable or None): ``tokens(batch) -> number``, the micro-batch's loss-token
            count, read before ``training_step``; give it when the loss is a token sum over the
            step's tokens, e.g. ``lambda b: mlfop.integrations.accelerate.loss_tokens(b["labels"])``.
            ``None``: streams are weighted by micro-batches (right for per-micro-batch means).
        remove_key (bool): take ``stream_key`` out of a dict batch before ``training_step``
            (default: True).

    The value under the key may be a name or id, a list of them (as the default collate makes
    of a string field), or a tensor of ids; all values of one micro-batch must agree.
    """

    def __init__(
        self,
        stream_key: str | None = "stream",
        stream_names: Mapping[Any, str] | Sequence[str] | None = None,
        tokens: Callable[[Any], Any] | None = None,
        remove_key: bool = True,
    ) -> None:
        super().__init__()
        self.key = StreamKey(stream_key, stream_names, who="MLFOPFolding")
        if tokens is not None and not callable(tokens):
            raise TypeError(f"tokens must be a callable batch -> count or None, got {tokens!r}")
        self.stream_key = stream_key
        self.tokens = tokens
        self.remove_key = bool(remove_key)
        self._pending: tuple[str | None, Any] | None = None
        self._stepped = False

    # ----------------------------------------------------------------- optimizer
    @staticmethod
    def mlfop_optimizer(trainer: Any) -> Any:
        """The trainer's :class:`mlfop.MLFOPSOAP` (the one optimizer with ``fold()``)."""
        found = []
        for optimizer in trainer.optimizers:
            try:
                found.append(unwrap_optimizer(optimizer))
            except TypeError:
                pass
        if len(found) != 1:
            names = [type(o).__name__ for o in trainer.optimizers]
            raise TypeError(
                f"MLFOPFolding needs configure_optimizers() to return exactly one mlfop.MLFOPSOAP "
                f"(an optimizer with fold()), got {names}"
            )
        return found[0]

    # --------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "MLFOPFolding is for automatic optimization; with automatic_optimization=False call "
                "optimizer.fold(stream) after self.manual_backward(loss) instead"
            )
        self.key.check_optimizer(self.mlfop_optimizer(trainer).streams)
        self._pending, self._stepped = None, False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._set_sampler_epoch(trainer)  # also when resuming in the middle of an epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._set_sampler_epoch(trainer)

    @staticmethod
    def _set_sampler_epoch(trainer: Any) -> None:
        """Lightning sets the epoch of samplers, not of batch samplers: a StreamBatchSampler's here."""
        def set_epoch(loader: DataLoader) -> None:
            if isinstance(loader.batch_sampler, StreamBatchSampler):
                loader.batch_sampler.set_epoch(trainer.current_epoch)

        apply_to_collection(trainer.train_dataloader, DataLoader, set_epoch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        name = self.key.stream_of(batch, self.mlfop_optimizer(trainer).streams)
        count = self.tokens(batch) if self.tokens is not None else None
        if self.stream_key is not None and self.remove_key and isinstance(batch, MutableMapping):
            del batch[self.stream_key]
        self._pending = (name, count)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is None:
            raise RuntimeError(
                "MLFOPFolding: a backward ran without on_train_batch_start having read its stream "
                "(is the callback passed to the Trainer that runs this fit?)"
            )
        name, count = self._pending
        self._pending = None
        if isinstance(count, torch.Tensor):
            count = count.item()
        if count is not None and count <= 0:  # no loss token: the micro-batch added nothing
            return
        self.mlfop_optimizer(trainer).fold(name, tokens=count)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:  # the accumulation ended: forget its folds even if the step was skipped
            self._stepped = False
            self.mlfop_optimizer(trainer).zero_grad(set_to_none=True)
