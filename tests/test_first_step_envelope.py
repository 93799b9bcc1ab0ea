"""Smoke test of benchmarks/first_step_envelope.py on a small batch of the default job."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "first_step_envelope.py"


def test_head_blocks_leave_the_envelope_and_no_update_exceeds_the_learning_rate(capsys):
    spec = importlib.util.spec_from_file_location("first_step_envelope", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    measured = module.main(["--batch", "128", "--micro-batch", "64"])
    table = capsys.readouterr().out
    assert table.count("\n| global+layer") == 3  # layer blocks of both settings, head blocks of one
    heads, layers = measured["global+layer+head"], measured["global+layer"]
    assert "head envelope" not in layers and len(heads["head envelope"]) == len(heads["head update/lr"]) > 0
    # the combination leaves the streams' envelope on head blocks by orders of magnitude ...
    assert max(heads["head envelope"]) > 100 * max(layers["layer envelope"])
    # ... and V = max(envelope, g_comb^2) keeps every coordinate of the first update within the lr
    for found in (heads, layers):
        for key in ("layer update/lr", "head update/lr"):
            assert max(found.get(key, [0.0])) <= 1 + 1e-5
