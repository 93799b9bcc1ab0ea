"""Integrations of :class:`mlfop.MLFOPSOAP` with training engines.

Each submodule imports its engine when it is itself imported; ``import mlfop`` never imports
them, so the engines stay optional extras:

- :mod:`mlfop.integrations.transformers`: :class:`~mlfop.integrations.transformers.MLFOPTrainer`,
  a ``transformers.Trainer`` that folds each micro-batch into its stream, and
  :class:`~mlfop.integrations.transformers.StreamCollator`, which keeps the stream column
  through the data collator.
- :mod:`mlfop.integrations.accelerate`: :class:`~mlfop.integrations.accelerate.StreamFolding`
  (and :func:`~mlfop.integrations.accelerate.fold_after_backward`) for the
  ``accelerator.accumulate(...)`` loop; imports no engine itself.
- :mod:`mlfop.integrations.lightning`: :class:`~mlfop.integrations.lightning.MLFOPFolding`, a
  Lightning callback that folds in ``on_after_backward``.
"""

__all__: list[str] = []
