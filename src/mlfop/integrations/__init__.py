"""Integrations of :class:`mlfop.MLFOPSOAP` with training engines.

Each submodule imports its engine when it is itself imported; ``import mlfop`` never imports
them, so the engines stay optional extras:

- :mod:`mlfop.integrations.transformers`: :class:`~mlfop.integrations.transformers.MLFOPTrainer`,
  a ``transformers.Trainer`` that folds each micro-batch into its stream, and
  :class:`~mlfop.integrations.transformers.StreamCollator`, which keeps the stream column
  through the data collator.
"""

__all__: list[str] = []
