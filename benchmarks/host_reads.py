"""Host reads per regular optimizer step, for two model sizes: ``python benchmarks/host_reads.py``.

Counts, with the counter of ``tests/optim/test_host_reads.py`` (``item()``/``float()``/
``bool()`` of tensors, data-dependent shapes, ``eigh``, ``tolist()``), the reads of the fifth
step (no refresh) of ``mlfop.SOAP`` and of ``mlfop.MLFOPSOAP`` with two folded streams and the
head level. Run it with another checkout's ``src`` first on ``PYTHONPATH`` to count that core.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _counter_module():
    path = Path(__file__).resolve().parents[1] / "tests" / "optim" / "test_host_reads.py"
    spec = importlib.util.spec_from_file_location("host_reads_counter", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    counter = _counter_module()
    print("| optimizer | layers | parameter tensors | reads per step | reads per fold |")
    print("|---|---|---|---|---|")
    for kind, label in (("soap", "SOAP"), ("mlfop", "MLFOPSOAP, 2 streams")):
        for layers in (1, 6):
            fold_reads, step_reads = counter._reads_of_a_regular_step(kind, layers)
            folds = 20 if kind == "mlfop" else 0
            per_fold = f"{len(fold_reads) / folds:g}" if folds else "–"
            print(f"| {label} | {layers} | {6 * layers} | {len(step_reads)} | {per_fold} |")


if __name__ == "__main__":
    main()
