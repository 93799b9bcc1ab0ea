"""benchmarks/und_plateau.py: the replay equals the run it replays; the class-information measure."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mlfop.bench.cli import main as bench

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "und_plateau.py"


@pytest.fixture(scope="module")
def plateau():
    spec = importlib.util.spec_from_file_location("und_plateau", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_class_info_is_the_between_class_share_of_variance(plateau):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    centres = torch.randn(4, 6, generator=generator)
    assert plateau.class_info(centres[labels], labels) == pytest.approx(1.0, abs=1e-6)
    noise = torch.randn(400, 6, generator=generator)
    assert plateau.class_info(noise, labels) < 0.05
    # equal parts of between and within variance: about one half
    assert plateau.class_info(centres[labels] / centres.std() + noise, labels) == pytest.approx(0.5, abs=0.15)
    assert plateau.spread(torch.ones(400, 6) * 3 + 1e-4 * noise) < 1e-8
    assert plateau.spread(noise) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("model", ["janus", "emu3"])
def test_replay_retraces_the_run_and_probes_every_part(plateau, model, tmp_path):
    folder = tmp_path / "run"
    assert bench(["run", "--model", model, "--hidden", "32", "--layers", "2", "--heads", "2", "--mlp", "64",
                  "--batch", "32", "--micro-batch", "8", "--steps", "4", "--eval-every", "2", "--samples", "0",
                  "--optimizers", "mlfop", "--output", str(folder)]) == 0
    records = plateau.replay(folder, steps=4, every=2)
    trained = {r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"}
    assert [r["step"] for r in records] == [0, 2, 4]
    for record in records[1:]:
        assert (record["loss_gen"], record["loss_und"]) == (trained[record["step"]]["loss_gen"],
                                                             trained[record["step"]]["loss_und"])
        parts = {"step_attention", "step_mlp"} | ({"step_vision", "step_aligner"} if model == "janus" else set())
        assert parts <= record.keys() and all(record[k] > 0 for k in parts)
        assert all(0 <= record[k] <= 1 + 1e-6 for k in ("image", "L1", "L2", "spread_image", "spread_L1", "spread_L2"))
