"""Bad input: one line on stderr naming the accepted values, exit code 2, nothing written."""

import pytest

from mlfop.bench.cli import main
from mlfop.bench.config import RunConfig

TINY = ["--steps", "2", "--batch", "8", "--micro-batch", "4", "--samples", "0", "--tokenizer", "pix8"]


def _fails(argv, capsys, tmp_path, *expected):
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlfop-bench: error: "), err
    for word in expected:
        assert word in err, (word, err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing new under the working folder
    return err


@pytest.mark.parametrize("flag, value, accepted", [
    ("--model", "gpt2", ("gpt2", "emu3", "janus")),
    ("--tokenizer", "vq", ("vq", "km64", "pix8")),
    ("--optimizers", "sgd", ("sgd", "adamw", "soap", "mlfop", "upgrad")),
    ("--targets", "bleu=1", ("bleu", "gen_nll", "und_acc")),
    ("--lrs", "lion=1e-3", ("lion", "adamw", "mlfop")),
    ("--levels", "block", ("block", "global", "layer", "head")),
    ("--muon-adjust-lr", "rms", ("rms", "original", "match_rms_adamw")),
    ("--optimizers", "lion", ("lion", "muon", "famo")),
])
def test_unknown_names(flag, value, accepted, capsys, tmp_path):
    _fails(["run", *TINY, flag, value, "--output", str(tmp_path / "out")], capsys, tmp_path, *accepted)


def test_micro_batch_must_divide_batch(capsys, tmp_path):
    _fails(["run", "--batch", "64", "--micro-batch", "24", "--output", str(tmp_path / "out")], capsys, tmp_path,
           "does not divide", "32")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_non_positive_steps(steps, capsys, tmp_path):
    _fails(["run", *TINY, "--steps", steps, "--output", str(tmp_path / "out")], capsys, tmp_path, "steps")


@pytest.mark.parametrize("argv, expected", [
    (["--train-samples", "100", "--batch", "64", "--micro-batch", "32"], ("not a multiple of batch 64", "64 or 128")),
    (["--train-samples", "640", "--steps", "3"], ("steps or train_samples",)),
    (["--batch", "4096", "--micro-batch", "2048"], ("exceeds the 1437 training images",)),
    (["--diverge-factor", "0.5"], ("diverge_factor",)),
    (["--diverge-patience", "0"], ("diverge_patience", ">= 1")),
    (["--lrs", "muon=-1"], ("lrs for muon",)),
    (["--muon-adamw-lrs", "0"], ("muon_adamw_lrs",)),
    (["--outer-lr", "-1"], ("outer_lr", "[0, inf]")),
    (["--eta-range", "1", "0.5"], ("eta_range", "low <= high")),
    (["--eta-range", "1"], ("eta_range", "two positive")),
    (["--beta-max", "-1"], ("beta_max",)),
])
def test_bad_budget_and_stability_options(argv, expected, capsys, tmp_path):
    without_steps = TINY[2:]
    _fails(["run", *without_steps, *argv, "--output", str(tmp_path / "out")], capsys, tmp_path, *expected)


@pytest.mark.parametrize("argv, expected, fine", [
    (["--stream-weights", "fixed"], ("'fixed' equals 'tokens' here", "loss_weighting token"),
     [{"loss_weighting": "token"}, {"fold_tokens": True}, {"text_stream": True, "batch": 20}, {"optimizers": ("soap",)}]),
    (["--stream-weights", "balanced", "--levels", "layer", "head"], ("without the global level",),
     [{"levels": ("global", "head")}, {"stream_weights": "tokens"}]),
])
def test_stream_weights_that_change_nothing(argv, expected, fine, capsys, tmp_path):
    _fails(["run", *TINY, *argv, "--output", str(tmp_path / "out")], capsys, tmp_path, *expected)
    asked = {"stream_weights": argv[1], "levels": tuple(argv[3:]) or RunConfig().levels, "batch": 8, "micro_batch": 4}
    for changes in fine:  # one change makes each a setting where the weights matter (or nobody reads them)
        RunConfig(**{**asked, **changes}).validate()


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails(["run", *TINY, "--output", str(blocker / "out")], capsys, tmp_path, "not writable")


def test_existing_output(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    _fails(["run", *TINY, "--output", str(tmp_path / "out")], capsys, tmp_path, "already exists")


def test_config_with_unknown_key(capsys, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('model = "emu3"\nlearning_rate = 0.1\n')
    _fails(["run", "--config", str(config), "--output", str(tmp_path / "out")], capsys, tmp_path,
           "learning_rate", "micro_batch", "optimizers")


def test_config_with_bad_value(capsys, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('optimizers = ["adamw", "adam"]\n')
    _fails(["run", "--config", str(config), "--output", str(tmp_path / "out")], capsys, tmp_path, "adam", "upgrad")


def test_resume_without_a_killed_run(capsys, tmp_path):
    _fails(["run", "--resume", "--output", str(tmp_path / "out")], capsys, tmp_path, "--resume")


def test_bad_flag_value_is_one_line(capsys, tmp_path):
    _fails(["run", "--steps", "many"], capsys, tmp_path, "--steps")


def test_report_of_a_non_run_folder(capsys, tmp_path):
    _fails(["report", str(tmp_path), "--output", str(tmp_path / "r")], capsys, tmp_path, "not a finished")
    _fails(["report", f"{tmp_path}:adamw", "--output", str(tmp_path / "r")], capsys, tmp_path, "not a finished")
    _fails(["report", f"{tmp_path}:bogus", "--output", str(tmp_path / "r")], capsys, tmp_path, "bogus is not")
