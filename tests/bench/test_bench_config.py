"""Configuration: file formats and precedence, the micro-batch plan and the objective's scales."""

import pytest

from mlfop.bench.cli import _parser, _run_config
from mlfop.bench.config import RunConfig
from mlfop.bench.objective import make_plan
from mlfop.bench.runner import run_specs


def _config(tmp_path, *argv):
    return _run_config(_parser().parse_args(["run", "--output", str(tmp_path / "out"), *argv]))


# the runs of the default optimizers at their default rates (adamw swept here)
DEFAULT_RUNS = ["adamw-lr0.001", "adamw-lr0.003", "muon-lr0.02-adamw0.003", "soap-lr0.01", "mlfop-lr0.01"]


def test_toml_and_yaml_sweeps_with_flags_on_top(tmp_path):
    (tmp_path / "sweep.toml").write_text(
        'model = "janus"\nseeds = [0, 1]\nsteps = 30\n[lrs]\nadamw = [1e-3, 3e-3]\nsoap = 1e-2\n')
    (tmp_path / "sweep.yaml").write_text(
        "model: janus\nseeds: [0, 1]\nsteps: 30\nlrs:\n  adamw: [1.0e-3, 3.0e-3]\n  soap: 1.0e-2\n")
    from_toml = _config(tmp_path, "--config", str(tmp_path / "sweep.toml"), "--steps", "12")
    from_yaml = _config(tmp_path, "--config", str(tmp_path / "sweep.yaml"), "--steps", "12")
    assert from_toml == from_yaml
    assert (from_toml.model, from_toml.steps, from_toml.seeds) == ("janus", 12, (0, 1))
    names = [spec.name for spec in run_specs(from_toml)]
    assert names == [*(f"{name}-s0" for name in DEFAULT_RUNS), *(f"{name}-s1" for name in DEFAULT_RUNS)]



def test_sample_budget_sets_the_steps_and_muon_sweeps_both_rates(tmp_path):
    config = _config(tmp_path, "--train-samples", "4096", "--batch", "1024", "--optimizers", "muon", "adamw",
                     "--lrs", "muon=0.01,0.02", "--muon-adamw-lrs", "1e-3", "3e-3")
    assert config.steps == 4 and config.train_samples == 4096
    assert [spec.name for spec in run_specs(config)] == [
        "muon-lr0.01-adamw0.001-s0", "muon-lr0.01-adamw0.003-s0", "muon-lr0.02-adamw0.001-s0",
        "muon-lr0.02-adamw0.003-s0", "adamw-lr0.003-s0"]


def test_flags(tmp_path):
    config = _config(tmp_path, "--optimizers", "mlfop", "--levels", "global", "--lrs", "mlfop=2e-3,4e-3",
                     "--targets", "fd=300", "--no-augment", "--text-stream", "--no-stream-statistics",
                     "--no-noise-shrinkage", "--stream-weights", "balanced", "--clip", "0", "--probe-every", "5",
                     "--beta-max", "0.5", "--eta-range", "1", "1")
    assert config.levels == ("global",) and config.lrs == {"mlfop": (2e-3, 4e-3)}
    assert config.targets == {"fd": 300.0} and not config.augment and config.streams == ("gen", "und", "text")
    assert (config.stream_statistics, config.noise_shrinkage, config.stream_weights) == (False, False, "balanced")
    assert (config.clip, config.probe_every) == (0.0, 5)
    assert (config.beta_max, config.eta_range) == (0.5, (1.0, 1.0))


def test_levels_flag_without_a_value_turns_every_level_off(tmp_path):
    assert _config(tmp_path, "--optimizers", "mlfop", "--levels").levels == ()


@pytest.mark.parametrize("batch, micro, text, mix, expected", [
    (1024, 64, False, (1, 1, 1), {"gen": 8, "und": 8}),
    (1024, 64, True, (1, 1, 1), {"gen": 6, "und": 5, "text": 5}),
    (64, 32, False, (1, 1, 1), {"gen": 1, "und": 1}),
    (512, 64, True, (5, 2, 1), {"gen": 5, "und": 2, "text": 1}),
])
def test_micro_batch_split(batch, micro, text, mix, expected):
    config = RunConfig(batch=batch, micro_batch=micro, text_stream=text, mix=mix).validate()
    assert config.micro_batches() == expected


def test_objective_scales():
    task = make_plan(RunConfig(batch=64, micro_batch=16).validate(), image_tokens=16)
    # two micro-batches per stream; L = 0.5 L_gen + 0.5 L_und with per-token means
    assert task.scales["gen"] == pytest.approx(0.5 / (2 * 16 * 16))
    assert task.scales["und"] == pytest.approx(0.5 / (2 * 16))
    assert [s for s, _ in task.micro] == ["gen", "und", "gen", "und"]
    token = make_plan(RunConfig(batch=64, micro_batch=16, loss_weighting="token").validate(), image_tokens=16)
    assert token.scales["gen"] == pytest.approx(token.scales["und"]) == pytest.approx(1 / (2 * 16 * 17))
