"""Metric helpers: Frechet distance, the independent sampler line, targets and flags."""

import math

import numpy as np
from scipy import linalg

from mlfop.bench.data import DigitsData, load_split
from mlfop.bench.metrics import (divergence, frechet_distance, longest_run_above, peak_loss_ratio, references,
                                 run_flags, time_to_targets)
from mlfop.bench.tokenizers import Pix8


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 5)), rng.normal(size=(300, 5)) @ np.diag([1, 2, 3, 1, 1]) + 1
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx + cy - 2 * linalg.sqrtm(cx @ cy)).real
    assert math.isclose(frechet_distance(x, y), expected, rel_tol=1e-9)
    assert frechet_distance(x, x) < 1e-6


def test_reference_lines_match_the_research_note():
    train, test = load_split()
    refs = references(DigitsData(train, test, Pix8(), augment=False), samples=360)
    assert abs(refs["independent_sampler_nll"] - 1.029) < 0.002  # measured value for pix8
    assert abs(refs["und_prior_nll"] - math.log(10)) < 0.01
    assert 30 < refs["fd_noise_floor"] < 60


def test_time_to_targets_and_flags():
    keys = ("step", "train_seconds", "train_cpu_seconds", "gen_nll", "und_nll", "und_acc")
    evals = [dict(zip(keys, values)) for values in ((0, 0.0, 0.0, 4.0, 2.4, 0.1), (10, 5.0, 4.0, 3.0, 2.3, 0.15),
                                                    (20, 9.0, 8.5, 2.0, 2.2, 0.5))]
    reached = time_to_targets(evals, {"gen_nll": 3.0, "und_acc": 0.5}, batch=64)
    assert reached == {"steps_to_gen_nll": 10, "samples_to_gen_nll": 640, "seconds_to_gen_nll": 5.0,
                       "cpu_seconds_to_gen_nll": 4.0, "steps_to_und_acc": 20, "samples_to_und_acc": 1280,
                       "seconds_to_und_acc": 9.0, "cpu_seconds_to_und_acc": 8.5, "steps_to_all": 20,
                       "samples_to_all": 1280, "seconds_to_all": 9.0, "cpu_seconds_to_all": 8.5}
    refs = {"gen_prior_nll": 3.4, "und_prior_nll": 2.3}
    assert run_flags(evals, refs, stopped=None) == {"diverged": False, "divergence": None, "stalled_gen": False,
                                                    "stalled_und": False, "overfit_gen": False, "overfit_und": False}
    stuck = evals[:2]
    assert run_flags(stuck, refs, stopped=None)["stalled_und"]
    assert run_flags(evals, refs, stopped="exploded") | {"stalled_gen": None} == {
        "diverged": True, "divergence": "exploded", "stalled_gen": None, "stalled_und": False, "overfit_gen": False,
        "overfit_und": False}
    assert time_to_targets(evals, {"und_acc": 0.9}, batch=64)["samples_to_all"] is None


def test_held_out_loss_above_its_start_or_not_finite_is_divergence_and_a_stall():
    start = {"step": 0, "gen_nll": 4.0, "und_nll": 2.4, "und_acc": 0.1}
    refs = {"gen_prior_nll": 3.4, "und_prior_nll": 2.3}
    grew = run_flags([start, {**start, "step": 5, "gen_nll": 2.0, "und_nll": 2.5}], refs, stopped=None)
    assert grew["divergence"] == "heldout_grew" and not grew["stalled_gen"] and grew["stalled_und"]
    broken = run_flags([start, {**start, "gen_nll": math.nan, "und_nll": math.inf, "und_acc": 0.1}], refs, None)
    assert broken["diverged"] and broken["stalled_gen"] and broken["stalled_und"]


def test_a_task_learned_then_lost_while_the_training_loss_falls_is_overfit_not_stalled():
    refs = {"gen_prior_nll": 3.4, "und_prior_nll": 2.3}
    evals = [{"step": s, "gen_nll": g, "und_nll": 2.0, "und_acc": 0.9}
             for s, g in ((0, 4.0), (10, 1.8), (20, 2.9), (30, 3.38))]  # best 1.8, ends at the prior
    overfit = run_flags(evals, refs, None, {"loss_gen": 0.4, "loss_und": 0.1})
    assert overfit["overfit_gen"] and not overfit["stalled_gen"] and not overfit["diverged"]
    # the training loss no lower than the best held-out value: lost, not overfit, so a stall
    lost = run_flags(evals, refs, None, {"loss_gen": 1.8, "loss_und": 0.1})
    assert lost["stalled_gen"] and not lost["overfit_gen"]
    assert run_flags(evals, refs, None)["stalled_gen"]  # no training loss known: a stall
    never = [evals[0], {**evals[-1], "gen_nll": 3.36}]  # never clearly below the prior
    assert run_flags(never, refs, None, {"loss_gen": 0.4})["stalled_gen"]
    assert not run_flags(evals, refs, "exploded", {"loss_gen": 0.4})["overfit_gen"]
    # understanding just starting to learn at the end of the budget (Janus, batch 1024, AdamW
    # 0.01: best 0.09 nats below the prior, the last training batch 0.08 below that): a stall
    starting = [{"step": s, "gen_nll": 2.0, "und_nll": u, "und_acc": 0.15}
                for s, u in ((0, 3.25), (190, 2.209), (200, 2.262))]
    late = run_flags(starting, refs, None, {"loss_gen": 1.5, "loss_und": 2.134})
    assert late["stalled_und"] and not late["overfit_und"]


def test_divergence_of_a_step():
    first = {"loss_gen": 4.0, "loss_und": 4.5}
    assert divergence({"loss_gen": 7.9, "loss_und": 1.0}, first, factor=2.0) == (None, 0)
    assert divergence({"loss_gen": 8.1, "loss_und": 1.0}, first, factor=2.0) == ("exploded", 1)
    assert divergence({"loss_gen": 80.0, "loss_und": 1.0}, first, factor=0) == (None, 0)
    assert divergence({"loss_gen": math.nan, "loss_und": 1.0}, first, factor=0)[0] == "nonfinite"
    assert divergence({"loss_gen": math.nan, "loss_und": 1.0}, first, factor=2.0, patience=5)[0] == "nonfinite"


def test_divergence_with_patience_needs_consecutive_steps_above_the_line():
    first = {"loss_gen": 4.0, "loss_und": 4.5}
    spike, calm = {"loss_gen": 9.0, "loss_und": 1.0}, {"loss_gen": 4.0, "loss_und": 9.0}  # 9 < 2 x 4.5
    streak, reasons = 0, []
    for losses in (spike, calm, spike, spike, calm, spike, spike, spike):
        reason, streak = divergence(losses, first, factor=2.0, patience=3, streak=streak)
        reasons.append(reason)
    assert reasons == [None] * 7 + ["exploded"]  # the spikes of 1 and 2 steps are ridden out
    assert divergence(spike, first, factor=0, patience=1, streak=4) == (None, 0)


def test_peak_loss_ratio_is_the_worst_spike_of_any_stream_over_its_first_loss():
    trains = [{"step": 1, "loss_gen": 4.0, "loss_und": 3.0, "grad_norm": 9.0},
              {"step": 2, "loss_gen": 6.0, "loss_und": 2.0, "grad_norm": 90.0},
              {"step": 3, "loss_gen": 3.0, "loss_und": 5.1},
              {"step": 4, "loss_gen": math.nan, "loss_und": 1.0}]
    assert peak_loss_ratio(trains) == 5.1 / 3.0  # understanding's spike; gradient norms are not losses
    assert peak_loss_ratio(trains[:1]) == 1.0
    assert peak_loss_ratio([]) is None
    assert peak_loss_ratio([{"step": 1, "loss_gen": math.inf}]) is None


def test_longest_run_above_counts_consecutive_steps_of_any_stream_above_the_line():
    first = {"step": 1, "loss_gen": 4.0, "loss_und": 3.0, "grad_norm": 1.0}
    losses = [(9.0, 1.0), (1.0, 1.0), (1.0, 7.0), (8.5, 1.0), (None, 1.0), (1.0, 6.5), (1.0, 1.0)]
    trains = [first] + [{"step": i + 2, "loss_gen": g, "loss_und": u, "grad_norm": 99.0}
                        for i, (g, u) in enumerate(losses)]
    assert longest_run_above(trains, 2.0) == 2  # und then gen (steps 4-5); a missing loss breaks the run
    assert longest_run_above(trains, 2.2) == 1  # 9 and 7 pass this line, 8.5 and 6.5 do not
    assert longest_run_above(trains, 3.0) == 0
    assert longest_run_above(trains[:1], 2.0) == 0 and longest_run_above([], 2.0) == 0
