"""benchmarks/study.py: plans checked up front, the stages (sweep, widening, seeds), and a two-job
study stopped with Ctrl-C, restarted to the end, and then found complete."""

import importlib.util
import json
import signal
import sys
import time
import types
from pathlib import Path

import pytest

from mlfop.bench import cli
from mlfop.bench.config import BenchError, RunConfig
from mlfop.bench.runfolder import folder_state
from mlfop.bench.summary import setting

ROOT = Path(__file__).resolve().parents[1]
TINY = """
models = ["emu3"]
evals = 2
probes = 2
targets = {gen_nll = 3.3}
[common]
hidden = 16
layers = 1
heads = 2
mlp = 32
samples = 0
tokenizer = "pix8"
steps = 150
[batches.8]
micro_batch = 4
"""


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _plan(tmp_path, contenders, **top):
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in {"root": str(tmp_path / "runs"), **top}.items())
    (tmp_path / "plan.toml").write_text(text + TINY + contenders)
    return str(tmp_path / "plan.toml")


@pytest.mark.parametrize("contenders, expected", [
    ('[contenders.a]\noptimizer = "adamw"\n', "needs an optimizer and its lrs"),
    ('[contenders.a]\noptimizer = "adamw"\nlrs = [1e-2]\nlearning_rate = 1\n', "unknown config key 'learning_rate'"),
    ('[contenders.a]\noptimizer = "lion"\nlrs = [1e-2]\n', "unknown optimizer 'lion'"),
    ('[contenders.a]\noptimizer = "adamw"\nlrs = [1e-2]\nbatches = [64]\n', "names batches [64]"),
])
def test_a_bad_plan_is_refused_before_anything_runs(contenders, expected, study, tmp_path, capsys):
    assert study.main([_plan(tmp_path, contenders)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_set_overrides_plan_keys_without_a_copy_of_the_plan(study, tmp_path, capsys):
    path = _plan(tmp_path, '[contenders.a]\noptimizer = "adamw"\nlrs = [1e-3, 3e-3]\n')
    plan = study.Plan(path, ["contenders.a.lrs=[0.05]", "seeds=[3, 4]", "batches.8.micro_batch=2", "parallel=1"])
    assert [job.name for job in plan.sweep()] == ["emu3-b8/a/lr0.05-s3", "emu3-b8/a/lr0.05-s4"]
    assert plan.parallel == 1 and plan.config(plan.sweep()[0]).micro_batch == 2
    assert study.main([path, "--set", "contenders.a.lrs=[0.05]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--lrs adamw=0.05 " in out and out.count("\n") == 1, out


@pytest.mark.parametrize("override, expected", [
    ("contenders.b.lrs=[0.05]", "has no table contenders.b; accepted: a"),
    ("contenders.a.lrs=[0.05", "expected KEY=VALUE"),
    ("widen", "expected KEY=VALUE"),
    ("paralel=1", "unknown: paralel"),
    ("contenders.a.lrs=[]", "contender 'a' needs an optimizer and its lrs"),
    ("contenders.a.lrs=0.05", "contenders.a.lrs of the wrong kind"),
    ("contenders.a=1", "contenders.a of the wrong kind"),
    ("common=1", "common of the wrong kind"),
    ("seeds=0", "seeds of the wrong kind"),
])
def test_a_bad_override_is_refused_before_anything_runs(override, expected, study, tmp_path, capsys):
    path = _plan(tmp_path, '[contenders.a]\noptimizer = "adamw"\nlrs = [1e-3]\n')
    assert study.main([path, "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def _final(job, samples, loss):
    config = RunConfig(lrs={"adamw": (job.lr,)}).to_dict()
    return {"optimizer": "adamw", "lr": job.lr, "seed": job.seed, "samples_to_all": samples, "gen_nll": loss,
            "und_nll": 1.0, "setting": setting(config, "adamw")}


def test_stages_widen_past_an_edge_then_seed_the_best_rate(study, tmp_path):
    plan = study.Plan(_plan(tmp_path, '[contenders.a]\noptimizer = "adamw"\nlrs = [1e-3, 3e-3]\nextra_seeds = [1]\n',
                            widen=1))
    state = study.Study(plan)
    assert [job.name for job in state.pending()] == ["emu3-b8/a/lr0.001-s0", "emu3-b8/a/lr0.003-s0"]
    low, high = state.pending()
    state.finals.update({low: [_final(low, 64, 3.0)], high: [_final(high, 32, 3.0)]})
    widened = state.pending()  # the best is the highest rate: one more past it, at the grid's ratio
    assert [job.lr for job in widened] == [0.009]
    state.finals[widened[0]] = [_final(widened[0], 48, 3.0)]
    assert [job.name for job in state.pending()] == ["emu3-b8/a/lr0.003-s1"]  # interior now: its seed
    state.finals[state.pending()[0]] = [_final(state.pending()[0], 32, 3.0)]
    assert state.pending() == []


def test_a_two_job_study_stops_on_ctrl_c_and_restarts_to_the_end(study, tmp_path, monkeypatch, capsys):
    path = _plan(tmp_path, '[contenders.adamw]\noptimizer = "adamw"\nlrs = [1e-2, 3e-2]\n')
    plan = study.Plan(path)
    folders = [plan.folder(job) for job in plan.sweep()]
    real_sleep = time.sleep

    def interrupt_once_training(seconds):  # Ctrl-C as soon as a job trains (the other may still start up)
        deadline = time.monotonic() + 60
        while not any('"train"' in _text(f.with_name(f.name + ".partial") / "metrics.jsonl") for f in folders):
            assert time.monotonic() < deadline, [_text(f.with_name(f.name + ".log")) for f in folders]
            real_sleep(0.05)
        raise KeyboardInterrupt

    clock = types.SimpleNamespace(sleep=interrupt_once_training, strftime=time.strftime, perf_counter=time.perf_counter)
    monkeypatch.setattr(study, "time", clock)  # the driver's clock only (subprocess waits sleep too)
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a driver started with `&`: the jobs inherit it
    try:
        assert study.main([path]) == 130
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert "stopped: 0 jobs done, 2 interrupted (resumable)" in capsys.readouterr().out
    states = [folder_state(f) for f in folders]
    assert "interrupted" in states and set(states) <= {"interrupted", "unstarted", "new"}, states
    for folder, state in zip(folders, states):
        assert ("is resumable: mlfop-bench run --resume" in _text(folder.with_name(folder.name + ".log"))) == (
            state == "interrupted")

    monkeypatch.setattr(study, "time", time)
    assert study.main([path]) == 0
    out = capsys.readouterr().out
    assert out.count("(resume)") == states.count("interrupted") and "2 jobs done, 0 failed; the plan is complete" in out
    assert [folder_state(f) for f in folders] == ["finished", "finished"]
    config = json.loads((folders[0] / "config.json").read_text())
    assert (config["threads"], config["eval_every"], config["probe_every"]) == (1, 75, 75)
    bars = [_text(f.with_name(f.name + ".log")).count("\r") for f in folders]  # not one per 0.1 s
    assert max(bars) <= 2 * (1 + states.count("interrupted")), bars

    assert study.main([path]) == 0
    assert "start" not in capsys.readouterr().out


def _text(path):
    return path.read_text() if path.exists() else ""


def test_the_study_plans_of_the_repository_are_valid_and_run_no_job_twice(study, tmp_path):
    """Every sweep job's command makes, through the CLI, the job's configuration; and no two
    contenders of the plans (which share one root) train the same configuration."""
    seen = {}
    for path in sorted((ROOT / "benchmarks").glob("study*.toml")):
        plan = study.Plan(str(path))
        assert plan.sweep() and plan.parallel == 2 and plan.root == Path("study")
        plan.root = tmp_path / "study"
        for job in plan.sweep():
            wanted = plan.config(job).validate().to_dict()
            made = cli._run_config(cli._parser().parse_args(study.command(plan, job)[3:])).to_dict()
            assert made == wanted, job.name
            key = json.dumps({k: v for k, v in wanted.items() if k != "output"}, sort_keys=True)
            assert key not in seen, f"{path.name} {job.name} repeats {seen.get(key)}"
            seen[key] = f"{path.name} {job.name}"


def test_a_finished_folder_of_another_configuration_is_an_error(study, tmp_path):
    plan = study.Plan(_plan(tmp_path, '[contenders.a]\noptimizer = "adamw"\nlrs = [1e-2]\n'))
    job = plan.sweep()[0]
    folder = plan.folder(job)
    folder.mkdir(parents=True)
    held = json.loads(json.dumps(plan.config(job).validate().to_dict())) | {"micro_batch": 2}
    (folder / "config.json").write_text(json.dumps(held))
    (folder / "metrics.jsonl").write_text("")
    with pytest.raises(BenchError, match=r"holds a run of another configuration \(micro_batch differ\)"):
        study.Study(plan).pending()


def test_a_finished_folder_from_before_a_new_config_key_counts_as_the_same_run(study, tmp_path):
    plan = study.Plan(_plan(tmp_path, '[contenders.a]\noptimizer = "mlfop"\nlrs = [1e-2]\n'))
    job = plan.sweep()[0]
    folder = plan.folder(job)
    folder.mkdir(parents=True)
    held = json.loads(json.dumps(plan.config(job).validate().to_dict()))
    del held["beta_max"], held["eta_range"]  # keys added later, at their defaults
    (folder / "config.json").write_text(json.dumps(held))
    (folder / "metrics.jsonl").write_text("")
    assert study.Study(plan).finished(job)
    held["eta_range"] = [1.0, 1.0]  # a non-default value is another run
    (folder / "config.json").write_text(json.dumps(held))
    with pytest.raises(BenchError, match=r"another configuration \(eta_range differ\)"):
        study.Study(plan).finished(job)
