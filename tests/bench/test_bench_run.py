"""End-to-end runs of ``mlfop-bench``: smoke per model and optimizer, determinism, resume, report."""

import json
import math
import shutil

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import mlfop.bench.loop
from mlfop.bench.cli import main
from mlfop.bench.report import load_finals
from mlfop.bench.tokenizers import load_tokenizer

TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--mlp", "64", "--batch", "32", "--micro-batch", "8",
        "--steps", "8", "--eval-every", "4", "--samples", "100", "--threads", "1"]
LRS = ["--lrs", "adamw=1e-2", "--lrs", "upgrad=1e-2", "--lrs", "soap=1e-2", "--lrs", "mlfop=1e-2", "--lrs", "muon=2e-2",
       "--muon-adamw-lrs", "1e-2", "--lrs", "famo=1e-2", "--lrs", "fop-muon=2e-2"]
EVERY = ["adamw", "soap", "mlfop", "upgrad", "muon", "famo", "fop-muon"]
TIMING = ("train_seconds", "train_cpu_seconds", "seconds_per_step")


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith(("seconds_to_", "cpu_seconds_to_"))}
            for r in records]


def _check_folder(folder, optimizers, streams, out):
    assert folder.is_dir() and not folder.with_name(folder.name + ".partial").exists()
    assert not (folder / "checkpoints").exists()
    config = json.loads((folder / "config.json").read_text())
    load_tokenizer(folder / "tokenizer.npz").decode(np.zeros((1, 16 if config["tokenizer"] == "km64" else 64), int))
    assert "independent_sampler_nll" in json.loads((folder / "references.json").read_text())
    records = _records(folder)
    finals = [r for r in records if r["kind"] == "final"]
    assert sorted(r["optimizer"] for r in finals) == sorted(optimizers)
    for final in finals:
        run = final["run"]
        train = [r for r in records if r["run"] == run and r["kind"] == "train"]
        evals = [r for r in records if r["run"] == run and r["kind"] == "eval"]
        assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [0, 4, 8]
        for stream in streams:
            losses = [r[f"loss_{stream}"] for r in train]
            assert all(math.isfinite(v) for v in losses)
            assert np.mean(losses[-2:]) < losses[0], (run, stream, losses)
        assert evals[-1]["gen_nll"] < evals[0]["gen_nll"] and evals[-1]["und_nll"] < evals[0]["und_nll"], run
        assert not final["diverged"]
        assert math.isfinite(final["fd"])
        scalars = EventAccumulator(str(folder / "tensorboard" / run)).Reload().Tags()["scalars"]
        assert {"train/grad_norm", "eval/gen_nll", *(f"train/loss_{s}" for s in streams)} <= set(scalars)
        assert matplotlib.image.imread(folder / f"samples_{run}.png").ndim == 3
        assert np.load(folder / "samples" / f"{run}.npy").shape == (100, 8, 8)
        assert f"| {final['optimizer']} |" in out
    assert matplotlib.image.imread(folder / "losses.png").ndim == 3
    summary = (folder / "summary.md").read_text()
    assert "| optimizer |" in summary and "losses.png" in summary
    assert "| optimizer |" in out and "steps→target" in out
    return records


def test_smoke_emu3_every_optimizer(tmp_path, capsys):
    optimizers = EVERY
    assert main(["run", *TINY, *LRS, "--model", "emu3", "--tokenizer", "km64", "--optimizers", *optimizers,
                 "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "274,112" not in out and "trainable parameters" in out
    records = _check_folder(tmp_path / "run", optimizers, ("gen", "und"), out)
    mlfop_train = [r for r in records if r["kind"] == "train" and r["run"].startswith("mlfop")]
    assert all(abs(r["weights_gen"] + r["weights_und"] - 1) < 1e-9 for r in mlfop_train[1:])


def test_smoke_janus_three_streams(tmp_path, capsys):
    optimizers = EVERY
    assert main(["run", *TINY, *LRS, "--model", "janus", "--tokenizer", "pix8", "--text-stream", "--batch", "48",
                 "--optimizers", *optimizers, "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "frozen (VQ model" in out
    records = _check_folder(tmp_path / "run", optimizers, ("gen", "und", "text"), out)
    mlfop_train = [r for r in records if r["kind"] == "train" and r["run"].startswith("mlfop")]
    assert all({"weights_gen", "weights_und", "weights_text", "conflict_fraction"} <= set(r) for r in mlfop_train[1:])
    assert all("text_nll" in r for r in records if r["kind"] == "eval")


RESUME = [*TINY, "--model", "emu3", "--tokenizer", "pix8", "--optimizers", "adamw", "mlfop", "--probe-every", "4"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", *RESUME, "--output", str(folder)]) == 0
    return folder


def test_same_seed_same_metrics(reference_run, tmp_path):
    assert main(["run", *RESUME, "--output", str(tmp_path / "again")]) == 0
    assert _without_timing(_records(tmp_path / "again")) == _without_timing(_records(reference_run))


def test_other_seed_other_metrics(reference_run, tmp_path):
    assert main(["run", *RESUME, "--seeds", "1", "--optimizers", "adamw", "--output", str(tmp_path / "s1")]) == 0
    first = lambda records: next(r for r in records if r["kind"] == "train")  # noqa: E731
    assert first(_records(tmp_path / "s1"))["loss_gen"] != first(_records(reference_run))["loss_gen"]


@pytest.mark.parametrize("killed_at", [2, 6])  # mlfop's step 2 (no checkpoint yet) or 6 (one at 4)
def test_ctrl_c_says_how_to_resume_and_resume_equals_uninterrupted(killed_at, reference_run, tmp_path, monkeypatch,
                                                                  capsys):
    calls = {"n": 0}
    real_step = mlfop.bench.loop.train_step

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 + killed_at:  # after adamw's 8 steps
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(mlfop.bench.loop, "train_step", killed)
    with pytest.raises(SystemExit) as stopped:
        main(["run", *RESUME, "--output", str(tmp_path / "run")])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mlfop-bench: interrupted; {tmp_path / 'run.partial'} is resumable: "
        f"mlfop-bench run --resume --output {tmp_path / 'run'}")
    monkeypatch.setattr(mlfop.bench.loop, "train_step", real_step)
    assert not (tmp_path / "run").exists() and (tmp_path / "run.partial" / "metrics.jsonl").is_file()
    assert main(["run", "--resume", "--output", str(tmp_path / "run")]) == 0
    assert _without_timing(_records(tmp_path / "run")) == _without_timing(_records(reference_run))
    assert not (tmp_path / "run.partial").exists()
    steps = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "mlfop-lr0.01-s0")).Reload().Scalars("train/lr")
    assert [event.step for event in steps] == list(range(1, 9))


def test_report_aggregates_folders(reference_run, tmp_path, capsys):
    seed1 = tmp_path / "s1"
    assert main(["run", *RESUME, "--seeds", "1", "--optimizers", "adamw", "--output", str(seed1)]) == 0
    # the reference folder twice: its seeds count once
    assert main(["report", str(reference_run), str(seed1), str(reference_run), "--output",
                 str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown in capsys.readouterr().out
    sweep = markdown.split("## ")[1]
    rows = {line.split(" | ")[3]: line for line in sweep.splitlines() if line.startswith("| emu3")}
    assert " | 2 | " in rows["adamw"] and " ± " in rows["adamw"]
    assert " | 1 | " in rows["mlfop"] and " ± " not in rows["mlfop"]
    assert "## Seeds at the chosen rates" in markdown and "## Stability" in markdown
    assert " (peak ×" in markdown.split("## Stability")[1].split("## ")[0]  # from the runs' training records
    assert matplotlib.image.imread(tmp_path / "report" / "curves-emu3-32.png").ndim == 3
    probes = [r for r in _records(reference_run) if r["kind"] == "probe"]
    assert [r["step"] for r in probes if r["run"].startswith("adamw")] == [1, 4, 8]
    assert {"model.layers.0", "lm_head"} <= set(probes[0]["layers"]) and -1 <= probes[0]["cos"] <= 1
    assert "## Gradient heterogeneity per layer" in markdown
    assert matplotlib.image.imread(tmp_path / "report" / "heterogeneity-1.png").ndim == 3


@pytest.mark.parametrize("patience", [1, 3])
def test_a_diverging_run_stops_and_is_flagged(patience, tmp_path, capsys):
    assert main(["run", *TINY, "--tokenizer", "pix8", "--optimizers", "adamw", "--lrs", "adamw=30", "--clip", "0",
                 "--diverge-factor", "1.5", "--diverge-patience", str(patience),
                 "--output", str(tmp_path / "run")]) == 0
    records = _records(tmp_path / "run")
    final = next(r for r in records if r["kind"] == "final")
    assert final["diverged"] and final["divergence"] == "exploded"
    assert final["diverged_step"] == final["step"] < 8
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in trains] == list(range(1, final["step"] + 1))
    above = [any(r[k] > 1.5 * trains[0][k] for k in ("loss_gen", "loss_und")) for r in trains]
    streaks = [all(above[i - patience + 1:i + 1]) for i in range(patience - 1, len(above))]
    assert streaks[-1] and not any(streaks[:-1])  # stopped at the first run of `patience` steps above the line
    assert final["step"] >= patience + 1  # the first step sets the line
    assert "diverged (" in capsys.readouterr().out


def test_report_takes_the_chosen_optimizers_of_a_folder(reference_run, tmp_path, capsys):
    assert main(["report", f"{reference_run}:mlfop,soap", "--output", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    optimizers = {line.split(" | ")[3] for line in markdown.splitlines() if line.startswith("| emu3")}
    assert optimizers == {"mlfop"}


def test_report_recomputes_flags_from_the_curve_and_references(reference_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy)
    stored = {r["run"]: r["stalled_gen"] for r in _records(copy) if r["kind"] == "final"}
    refs = json.loads((copy / "references.json").read_text())
    assert all(stored.values())  # the tiny run's generation does not leave its prior
    (copy / "references.json").write_text(json.dumps(refs | {"gen_prior_nll": 100.0}))  # every NLL is below it
    finals = load_finals([str(copy)])[0]
    assert not any(f["stalled_gen"] or f["overfit_gen"] for f in finals)
    assert all(f["best_gen_nll"] == min(r["gen_nll"] for r in f["curve"]) for f in finals)
    (copy / "references.json").unlink()  # a folder without references keeps its stored flags
    assert {f["run"]: f["stalled_gen"] for f in load_finals([str(copy)])[0]} == stored
