"""GPU step-time benchmark: ``step_time.py``'s interleaved table on a CUDA device.

Runs the accumulated-batch presets (``--preset accumulate8`` and ``accumulate32``) with float32
and bfloat16 parameters and prints, per setting, the same ratios as ``step_time.py`` plus the
absolute times (synchronised with ``torch.cuda.synchronize``) and the step's peak memory. Run it
wherever a GPU is at hand: ``python benchmarks/gpu_step_time.py`` (``--quick`` for a smoke run);
extra arguments go to every ``step_time.py`` run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SETTINGS = [("accumulate8", "float32"), ("accumulate8", "bfloat16"), ("accumulate32", "float32")]
OPTIMIZERS = ["adamw", "mlfop_soap", "mlfop_fop_k2", "mlfop_fop_k2+heads", "pytorch_optimizer"]


def _step_time():
    path = Path(__file__).with_name("step_time.py")
    spec = importlib.util.spec_from_file_location("step_time", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_step_time.py needs a CUDA device; on the CPU use benchmarks/step_time.py")
    step_time = _step_time()
    quick = "--quick" in argv
    for preset, dtype in SETTINGS[:1] if quick else SETTINGS:
        print(f"\n## {preset}, {dtype} parameters\n", flush=True)
        step_time.main([*([] if quick else ["--preset", preset]), "--device", "cuda", "--dtype", dtype,
                        "--optimizers", *OPTIMIZERS, *argv])


if __name__ == "__main__":
    main()
