"""``mlfop.bench``: tiny Emu3 and Janus trained on real digits, to compare optimizers (``mlfop-bench``).

Outside the optimizer core: this package imports :mod:`mlfop` through its public API, never the
reverse. Modules: :mod:`~mlfop.bench.data` (the digits split and batches),
:mod:`~mlfop.bench.tokenizers` (``pix8``, ``km64``), :mod:`~mlfop.bench.vocab` (token layouts),
:mod:`~mlfop.bench.models` (the tiny models), :mod:`~mlfop.bench.objective` (losses and the
micro-batch plan), :mod:`~mlfop.bench.optimizers` (contenders), :mod:`~mlfop.bench.loop` (one
run), :mod:`~mlfop.bench.heterogeneity` (the per-layer probe of the stream gradients),
:mod:`~mlfop.bench.metrics`, :mod:`~mlfop.bench.runfolder`, :mod:`~mlfop.bench.plots`,
:mod:`~mlfop.bench.summary`, :mod:`~mlfop.bench.report`, :mod:`~mlfop.bench.runner` and
:mod:`~mlfop.bench.cli` (the command).
"""
