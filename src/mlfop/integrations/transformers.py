"""Hugging Face ``transformers.Trainer`` with ML-FOP-SOAP's per-stream folding.

A user's script changes in two places: ``Trainer`` becomes :class:`MLFOPTrainer`, and each
example carries its stream in a column (``"stream"`` by default)::

    from mlfop.integrations.transformers import MLFOPTrainer

    trainer = MLFOPTrainer(
        model=model, args=TrainingArguments(..., weight_decay=0.1), train_dataset=dataset,  # mixed streams
        optimizer_kwargs={"streams": ("image", "text")},
    )
    trainer.train()

What :class:`MLFOPTrainer` does:

- **Optimizer**: it builds :class:`mlfop.MLFOPSOAP` from ``TrainingArguments``:
  ``learning_rate``, ``adam_beta1``/``adam_beta2`` (``betas``), ``adam_epsilon`` (``eps``),
  and ``weight_decay`` on Trainer's usual decay group (biases and norms get 0). The other
  arguments of the optimizer (``streams``, ``levels``, ``heads``, ...) go in
  ``optimizer_kwargs``. A value given both ways is an error, so nothing is silently
  overridden. ``args.optim`` is not used.
- **Data**: when the train dataset has the stream column, the train dataloader is built with
  :class:`mlfop.data.StreamBatchSampler` (micro-batch size, accumulation steps, world size,
  rank, seed and ``dataloader_drop_last`` from ``TrainingArguments``), so a mixed dataset
  gives single-stream micro-batches in its stream proportions in every optimizer step, and
  under DDP every process folds the same stream sequence over its own examples.
  ``group_by_stream=False`` keeps Trainer's sampler, for data already in single-stream
  micro-batches. Resume skips the trained micro-batches of the same deterministic sequence.
- **Streams**: every micro-batch must come from one stream. The collator is wrapped in
  :class:`StreamCollator`, which takes the column out of the examples before the wrapped
  collator runs (the default collator drops strings) and puts one value back per batch. The
  stream column is also kept when ``remove_unused_columns=True``. Values are stream names,
  integer ids into the optimizer's ``streams``, or keys of ``stream_names``.
- **Folding**: :meth:`MLFOPTrainer.training_step` takes the column out before the forward,
  runs Trainer's own forward and backward, and then calls ``optimizer.fold(stream, tokens=n)``.
  ``n`` is the micro-batch's loss-token count: labels other than -100, after the causal shift,
  which is the count Trainer sums into ``num_items_in_batch``. When Trainer does not normalise
  the loss by tokens (``num_items_in_batch`` is ``None``), the fold gets no count and the
  streams are weighted by micro-batches. The fold comes before Trainer's gradient clipping,
  and ``p.grad`` keeps the total, so clipping and the logged ``grad_norm`` work as usual
  (clipping is a global rescale, which ``step()`` accepts). ``bf16=True`` is tested on CPU;
  fp16 with a GradScaler relies on the same ``p.grad`` total but is not tested here.
- **Checkpoints**: Trainer's own ``save_steps`` and ``resume_from_checkpoint`` work. The
  optimizer is saved after its step, and a skipped step (non-finite gradients) still ends
  the accumulation, so the next save is not refused.

Importing this module imports ``transformers``. ``import mlfop`` never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, default_data_collator
from transformers.trainer_utils import seed_worker

from mlfop.data import StreamBatchSampler, plain_value, stream_column
from mlfop.integrations.accelerate import prepare_stream_loader
from mlfop.integrations.batch_streams import StreamKey, loss_tokens, unwrap_optimizer
from mlfop.optim.mlfop_soap import MLFOPSOAP

__all__ = ["MLFOPTrainer", "StreamCollator"]

# Optimizer arguments that TrainingArguments owns: optimizer keyword -> TrainingArguments field(s).
_FROM_TRAINING_ARGUMENTS = {
    "lr": "learning_rate",
    "betas": "adam_beta1 / adam_beta2",
    "eps": "adam_epsilon",
    "weight_decay": "weight_decay",
}


class StreamCollator:
    """Wraps a data collator so that the stream column reaches the batch as one value.

    The column is taken out of each example before ``collator`` runs (padding collators and
    ``default_data_collator`` cannot handle, or drop, a string column), and the batch gets
    ``batch[column] = value`` when all its examples agree, else the list of their values
    (fine for evaluation; :class:`MLFOPTrainer` refuses it in training). Examples without
    the column pass through unchanged; a batch where only some examples have it is an error.

    Args:
        collator: the collator to wrap (default: ``transformers.default_data_collator``).
        column: name of the stream column (default: ``"stream"``).
    """

    def __init__(self, collator: Callable[[list[Any]], Any] | None = None, column: str = "stream") -> None:
        if not isinstance(column, str) or not column:
            raise TypeError(f"column must be a non-empty string, got {column!r}")
        self.collator = default_data_collator if collator is None else collator
        self.column = column

    def __call__(self, features: list[Any]) -> Any:
        values, rest = [], []
        for feature in features:
            if isinstance(feature, Mapping) and self.column in feature:
                values.append(feature[self.column])
                rest.append({key: value for key, value in feature.items() if key != self.column})
            else:
                rest.append(feature)
        batch = self.collator(rest)
        if values:
            if len(values) != len(features):
                raise ValueError(
                    f"{len(features) - len(values)} of the {len(features)} examples of a batch have no "
                    f"{self.column!r} column; give every example its stream"
                )
            plain = [plain_value(value) for value in values]
            same = all(value == plain[0] for value in plain[1:])
            batch[self.column] = plain[0] if same else plain  # a mixed batch is refused in training only
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.collator!r}, column={self.column!r})"


class _EndAccumulation(TrainerCallback):
    """Ends each accumulation in the optimizer, also when the step was skipped.

    ``MLFOPSOAP.step()`` forgets the folds after a step it took; a step it refused
    (non-finite gradients) or that a GradScaler did not call leaves them, and the next
    checkpoint save would be refused. At ``on_step_end`` Trainer has already zeroed the
    gradients, so the optimizer's ``zero_grad()`` only forgets the folds.
    """

    def __init__(self, trainer: MLFOPTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = self.trainer.mlfop_optimizer(required=False)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)


class MLFOPTrainer(Trainer):
    """``transformers.Trainer`` that folds each micro-batch into its stream of :class:`mlfop.MLFOPSOAP`.

    Takes every argument of ``Trainer`` (keep ``optimizer_cls_and_kwargs`` out: use
    ``optimizer_cls`` and ``optimizer_kwargs``), plus, keyword-only:

    Args:
        stream_column (str or None): the batch column that names each micro-batch's stream
            (default: ``"stream"``). ``None`` makes an untagged run: nothing is read, and
            micro-batches alternate between the two sub-batch streams of an optimizer built
            with ``streams=None`` (the default ``streams`` then becomes ``None``).
        stream_names (Mapping or Sequence or None): maps the column's values to the
            optimizer's stream names: ``{value: name}``, or a sequence indexed by integer ids.
            ``None``: values are names, or integer ids into the optimizer's ``streams``.
        group_by_stream (bool): when the train dataset has the stream column, build the train
            dataloader with :class:`mlfop.data.StreamBatchSampler` (default: True), so that a
            mixed dataset gives single-stream micro-batches in its stream proportions in every
            accumulation, with the same stream sequence on every process. ``False``: Trainer's
            own sampler (then the data must already come in single-stream micro-batches).
        optimizer_kwargs (Mapping or None): more arguments of the optimizer, such as
            ``streams``, ``levels``, ``stream_weights``, ``heads`` (pass the model for head
            detection), ``precondition_frequency``. ``lr``, ``betas``, ``eps`` and
            ``weight_decay`` come from ``TrainingArguments`` and are refused here.
        optimizer_cls (type): the optimizer class, :class:`mlfop.MLFOPSOAP` or a subclass
            (default: ``MLFOPSOAP``).

    An optimizer passed through ``optimizers=(optimizer, scheduler)`` is used as given; it
    must have ``fold()``.
    """

    def __init__(
        self,
        *args: Any,
        stream_column: str | None = "stream",
        stream_names: Mapping[Any, str] | Sequence[str] | None = None,
        group_by_stream: bool = True,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        optimizer_cls: type = MLFOPSOAP,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(
                "MLFOPTrainer builds its optimizer from TrainingArguments (learning_rate, adam_beta1/2, "
                "adam_epsilon, weight_decay with Trainer's decay/no-decay groups); pass the other "
                "optimizer arguments as optimizer_kwargs={...} (and a subclass as optimizer_cls) "
                "instead of optimizer_cls_and_kwargs, whose param groups would override weight_decay"
            )
        self.stream_key = StreamKey(stream_column, stream_names, who="MLFOPTrainer", kind="column")
        if not isinstance(group_by_stream, bool):
            raise TypeError(f"group_by_stream must be True or False, got {group_by_stream!r}")
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, MLFOPSOAP)):
            raise TypeError(f"optimizer_cls must be mlfop.MLFOPSOAP or a subclass, got {optimizer_cls!r}")
        given = dict(optimizer_kwargs or {})
        owned = [key for key in given if key in _FROM_TRAINING_ARGUMENTS]
        if owned:
            fields = ", ".join(f"{key} -> TrainingArguments.{_FROM_TRAINING_ARGUMENTS[key]}" for key in owned)
            raise ValueError(
                f"optimizer_kwargs must not set {owned}: MLFOPTrainer takes them from TrainingArguments "
                f"({fields}) so that nothing is silently overridden"
            )
        if "params" in given:
            raise ValueError(
                "optimizer_kwargs must not set 'params': MLFOPTrainer groups the model's parameters itself"
            )
        if stream_column is None:
            given.setdefault("streams", None)
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizer_kwargs and optimizers is not None and optimizers[0] is not None:
            raise ValueError("optimizer_kwargs would be ignored: an optimizer was passed through optimizers=(...)")
        self.stream_column = stream_column
        self.group_by_stream = group_by_stream
        self.mlfop_optimizer_kwargs = given
        self.mlfop_optimizer_cls = optimizer_cls
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns and stream_column is not None and not hasattr(
            Trainer, "_set_signature_columns_if_needed"
        ):
            raise ValueError(
                f"this transformers version would drop the {stream_column!r} column: set "
                f"TrainingArguments(remove_unused_columns=False)"
            )
        if stream_column is not None and not (
            isinstance(self.data_collator, StreamCollator) and self.data_collator.column == stream_column
        ):
            self.data_collator = StreamCollator(self.data_collator, stream_column)
        self.add_callback(_EndAccumulation(self))

    # ----------------------------------------------------------------------- columns
    def _set_signature_columns_if_needed(self) -> None:
        """Trainer's list of the columns to keep, plus the stream column."""
        super()._set_signature_columns_if_needed()
        columns = getattr(self, "_signature_columns", None)
        if self.stream_column is not None and columns is not None and self.stream_column not in columns:
            columns.append(self.stream_column)

    # -------------------------------------------------------------------------- data
    def stream_batch_sampler(self) -> StreamBatchSampler | None:
        """The train set's :class:`mlfop.data.StreamBatchSampler`, or ``None`` for Trainer's own sampler.

        ``None`` with ``group_by_stream=False``, in an untagged run, for a dataset without
        length, or without the stream column. Its arguments come from ``TrainingArguments``:
        ``per_device_train_batch_size``, ``gradient_accumulation_steps``, the world size and
        process index, ``data_seed`` (else ``seed``), ``dataloader_drop_last``, and
        ``train_sampling_strategy`` ``"random"`` (shuffle) or ``"sequential"`` (no shuffle).
        """
        dataset, column = self.train_dataset, self.stream_column
        if not self.group_by_stream or column is None or isinstance(dataset, torch.utils.data.IterableDataset):
            return None
        try:
            streams = stream_column(dataset, column)
        except (KeyError, TypeError):
            return None
        strategy = self.args.train_sampling_strategy
        if strategy not in ("random", "sequential"):
            raise ValueError(
                f"train_sampling_strategy={strategy!r} cannot be combined with grouping the micro-batches by "
                f"stream: use 'random' or 'sequential', or MLFOPTrainer(group_by_stream=False)"
            )
        args = self.args
        return StreamBatchSampler(
            streams, self._train_batch_size, accumulation_steps=args.gradient_accumulation_steps,
            num_replicas=args.world_size, rank=args.process_index,
            seed=args.seed if args.data_seed is None else args.data_seed,
            shuffle=strategy == "random", drop_last=args.dataloader_drop_last,
        )

    def get_train_dataloader(self) -> Any:
        """Trainer's train dataloader, batched by :meth:`stream_batch_sampler` when it gives a sampler."""
        sampler = self.stream_batch_sampler()
        if sampler is None:
            return super().get_train_dataloader()
        dataset, collator = self.train_dataset, self.data_collator
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop the columns the model does not take
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        args = self.args
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collator, num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return prepare_stream_loader(self.accelerator, loader)

    # --------------------------------------------------------------------- optimizer
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer from ``TrainingArguments`` and ``optimizer_kwargs`` (once)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            trainable = [(name, p) for name, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [(n, p) for n, p in trainable if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [(n, p) for n, p in trainable if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = self.mlfop_optimizer_cls(
                [group for group in groups if group["params"]],
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                **self.mlfop_optimizer_kwargs,
            )
        return self.optimizer

    def mlfop_optimizer(self, required: bool = True) -> MLFOPSOAP | None:
        """The optimizer with ``fold()`` inside Trainer's wrappers (accelerate's ``AcceleratedOptimizer``)."""
        try:
            return unwrap_optimizer(self.optimizer, "let MLFOPTrainer build it or pass one through optimizers=(...)")
        except TypeError:
            if required:
                raise
            return None

    # ---------------------------------------------------------------------- training
    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Trainer's forward and backward of one micro-batch, then the fold into its stream."""
        optimizer = self.mlfop_optimizer()
        stream = self.stream_key.stream_of(inputs, optimizer.streams)
        inputs = self.stream_key.without(inputs)
        tokens = None if num_items_in_batch is None else self._loss_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if tokens is None or tokens > 0:  # no loss token: this micro-batch added exactly nothing
            optimizer.fold(stream, tokens=tokens)
        return loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Trainer's evaluation step, without the stream column."""
        return super().prediction_step(model, self.stream_key.without(inputs), *args, **kwargs)

    def _loss_tokens(self, inputs: Mapping[str, Any]) -> int | None:
        """Loss tokens of the micro-batch, counted as Trainer counts ``num_items_in_batch``."""
        if "shift_labels" in inputs:
            labels, shift = inputs["shift_labels"], False
        elif "labels" in inputs:
            labels, shift = inputs["labels"], getattr(self, "_loss_shifts_labels", True)
        else:
            return None
        return loss_tokens(labels, shift=shift) if isinstance(labels, torch.Tensor) else None
