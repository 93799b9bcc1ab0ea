"""Metric helpers: Frechet distance, the independent sampler line, targets and flags."""

import math

import numpy as np
from scipy import linalg

from mlfop.bench.data import DigitsData, load_split
from mlfop.bench.metrics import frechet_distance, references, run_flags, time_to_targets
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
    evals = [{"step": 0, "train_seconds": 0.0, "gen_nll": 4.0, "und_nll": 2.4, "und_acc": 0.1},
             {"step": 10, "train_seconds": 5.0, "gen_nll": 3.0, "und_nll": 2.3, "und_acc": 0.15},
             {"step": 20, "train_seconds": 9.0, "gen_nll": 2.0, "und_nll": 2.2, "und_acc": 0.5}]
    reached = time_to_targets(evals, {"gen_nll": 3.0, "und_acc": 0.5})
    assert reached == {"steps_to_gen_nll": 10, "seconds_to_gen_nll": 5.0, "steps_to_und_acc": 20,
                       "seconds_to_und_acc": 9.0, "steps_to_all": 20, "seconds_to_all": 9.0}
    refs = {"gen_prior_nll": 3.4, "und_prior_nll": 2.3}
    assert run_flags(evals, refs, nonfinite=False) == {"diverged": False, "stalled_gen": False, "stalled_und": False}
    stuck = evals[:2]
    assert run_flags(stuck, refs, nonfinite=False)["stalled_und"]
    assert run_flags(evals, refs, nonfinite=True)["diverged"]
    assert time_to_targets(evals, {"und_acc": 0.9})["steps_to_all"] is None
