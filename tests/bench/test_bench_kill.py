"""A run killed at each phase: the folder resumes (or a fresh run reuses it) to exactly the results
of an uninterrupted run, and every refusal says what to do; Ctrl-C and SIGTERM say how to resume.

The killed runs are real processes, forked from a server that imported the benchmark once
(``multiprocessing``'s forkserver), stopped by the ``MLFOP_BENCH_KILL_AT`` hook of
:func:`mlfop.bench.runfolder.kill_point`; the resumes run in this process.
"""

import fcntl
import json
import multiprocessing
import os
import signal
import sys

import pytest

from mlfop.bench.cli import main
from mlfop.bench.runfolder import KILL_AT, KILL_SIGNAL, folder_state

ARGS = ["--hidden", "16", "--layers", "1", "--heads", "2", "--mlp", "32", "--batch", "8", "--micro-batch", "4",
        "--steps", "4", "--eval-every", "2", "--samples", "0", "--tokenizer", "pix8", "--optimizers", "adamw",
        "--lrs", "adamw=1e-2,3e-2"]
FIRST = "adamw-lr0.01-s0"
TIMING = ("train_seconds", "train_cpu_seconds", "seconds_per_step")


def _child(argv, env, log):
    """The forked run: stdout and stderr to ``log``, the kill hook from ``env``."""
    os.environ.update(env)
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.stdout = sys.stderr = handle
        sys.exit(main(argv))


@pytest.fixture(scope="module")
def fork():
    """Run ``mlfop-bench ARGV`` in a forked process with ``env``; returns its exit code and output."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlfop.bench.cli"])

    def run(argv, env, log):
        process = context.Process(target=_child, args=(argv, env, str(log)))
        process.start()
        process.join(60)
        return process.exitcode, log.read_text()

    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", *ARGS, "--output", str(folder)]) == 0
    return _records(folder)


def _records(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and "seconds_to_" not in k}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _refused(argv, capsys, *expected):
    capsys.readouterr()
    with pytest.raises(SystemExit) as refusal:
        main(argv)
    err = capsys.readouterr().err
    assert refusal.value.code == 2 and err.count("\n") == 1, err
    for text in expected:
        assert text in err, (text, err)


@pytest.mark.parametrize("phase, state", [
    ("created", "unstarted"),  # the folder exists, nothing in it
    ("write:tokenizer.npz", "unstarted"),  # the tokenizer half-written (as a temporary file)
    ("write:config.json", "unstarted"),
    ("write:references.json", "interrupted"),
    ("step@3", "interrupted"),  # the first run past its checkpoint at step 2
    (f"write:checkpoints/{FIRST}.pt@2", "interrupted"),  # during its second checkpoint
    ("final@1", "interrupted"),  # the first run done, the second not started
    ("figures", "interrupted"),  # every run done, the summary not written
    ("finish", "interrupted"),  # checkpoints removed, the folder not yet renamed
])
def test_a_kill_at_each_phase_resumes_to_the_uninterrupted_result(phase, state, fork, reference, tmp_path, capsys):
    out = tmp_path / "run"
    code, log = fork(["run", *ARGS, "--output", str(out)], {KILL_AT: phase}, tmp_path / "log")
    assert code == -signal.SIGKILL, log
    assert folder_state(out) == state
    if state == "unstarted":
        _refused(["run", "--resume", "--output", str(out)], capsys, "run the original command again without --resume")
        assert main(["run", *ARGS, "--output", str(out)]) == 0
    else:
        _refused(["run", *ARGS, "--output", str(out)], capsys, f"mlfop-bench run --resume --output {out}")
        assert main(["run", "--resume", "--output", str(out)]) == 0
    assert folder_state(out) == "finished" and _records(out) == reference
    assert not list(tmp_path.rglob("*.tmp")) and not (out / ".lock").exists()
    _refused(["run", "--resume", "--output", str(out)], capsys, "is finished, nothing to resume")


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_with_the_resume_command(name, fork, tmp_path):
    out = tmp_path / "run"
    code, log = fork(["run", *ARGS, "--output", str(out)], {KILL_AT: "step@3", KILL_SIGNAL: name}, tmp_path / "log")
    assert code == 130
    assert log.splitlines()[-1] == (f"mlfop-bench: interrupted; {out}.partial is resumable: "
                                    f"mlfop-bench run --resume --output {out}")
    assert "Traceback" not in log and folder_state(out) == "interrupted"


def test_a_folder_in_use_is_refused(fork, tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = fork(["run", *ARGS, "--output", str(out)], {KILL_AT: "step"}, tmp_path / "log")
    assert code == -signal.SIGKILL
    with open(tmp_path / "run.partial" / ".lock", "a+") as lock:  # as a live run holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write("4242")
        lock.flush()
        _refused(["run", "--resume", "--output", str(out)], capsys, "in use by a running mlfop-bench (pid 4242)")
        _refused(["run", *ARGS, "--output", str(out)], capsys, "in use")


def test_a_resume_inside_a_run_of_steps_above_the_divergence_line_keeps_counting(fork, tmp_path):
    """The streak --diverge-patience counts is part of the checkpoint: a run killed after its
    second step, already above the line, stops where the uninterrupted run stops."""
    spiking = [*ARGS[:-1], "adamw=30", "--clip", "0", "--eval-every", "1", "--diverge-factor", "1.5",
               "--diverge-patience", "3"]
    assert main(["run", *spiking, "--output", str(tmp_path / "whole")]) == 0
    whole = _records(tmp_path / "whole")
    trains = [r for r in whole if r["kind"] == "train"]
    above = [r["loss_gen"] > 1.5 * trains[0]["loss_gen"] or r["loss_und"] > 1.5 * trains[0]["loss_und"]
             for r in trains]
    final = next(r for r in whole if r["kind"] == "final")
    assert final["divergence"] == "exploded" and final["diverged_step"] == 4 and above[1:4] == [True] * 3
    code, log = fork(["run", *spiking, "--output", str(tmp_path / "cut")], {KILL_AT: "step@3"}, tmp_path / "log")
    assert code == -signal.SIGKILL, log
    assert main(["run", "--resume", "--output", str(tmp_path / "cut")]) == 0  # from the checkpoint of step 2
    assert _records(tmp_path / "cut") == whole
