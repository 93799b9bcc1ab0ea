"""The tables: seeds grouped by setting, spreads, ratios to AdamW, settings spelled out, the best
rate of each sweep and the stability over rates."""

from mlfop.bench.config import RunConfig
from mlfop.bench.summary import (aggregate, best_rate_table, best_rates, claims_table, group_label, markdown_table,
                                 most_seeded, setting, stability_table)


def _final(optimizer, seed, steps, gen_nll, lr=1e-2, flags=(), adamw_lr=None, **changes):
    config = RunConfig(**changes).to_dict() | {"seeds": [seed]}
    record = {"optimizer": optimizer, "lr": lr, "seed": seed, "gen_nll": gen_nll, "und_nll": 1.0, "step": 60,
              "steps_to_all": steps, "samples_to_all": None if steps is None else steps * 1024,
              "cpu_seconds_to_all": None if steps is None else steps / 10, "train_cpu_seconds": 6.0,
              "setting": setting(config, optimizer), **{name: True for name in flags}}
    return record | ({"adamw_lr": adamw_lr} if adamw_lr is not None else {})


def _rows(table):
    return [line for line in table.splitlines() if line.startswith("| emu3")]


def test_seeds_group_and_ratios_use_adamw():
    finals = [_final("adamw", 0, 40, 3.0), _final("adamw", 1, 60, 3.2), _final("mlfop", 0, 25, 2.8),
              _final("mlfop", 1, None, 2.9)]
    rows = aggregate(finals)
    assert [(r["optimizer"], len(r["runs"])) for r in rows] == [("adamw", 2), ("mlfop", 2)]
    table = markdown_table(rows, {"gen_nll": 3.0})
    adamw, mlfop = _rows(table)
    assert "3.100 ± 0.141" in adamw
    assert "| 50 ± 14 | 51200 ± 14482 | 5.0 ± 1.4 | 1.00 | 1.00 | 0.10 ± 0.00 |" in adamw
    assert "25 ± 0 (1/2)" in mlfop and "| — | — |" in mlfop  # one seed missed the target: no ratio
    assert "setting" not in table.splitlines()[0] and "CPU s→target" in table.splitlines()[0]


def test_different_settings_are_separate_rows_with_a_setting_column():
    finals = [_final("adamw", 0, 40, 3.0), _final("mlfop", 0, 20, 2.8, levels=("global",)),
              _final("mlfop", 0, 30, 2.9)]
    table = markdown_table(aggregate(finals), {"gen_nll": 3.0})
    lines = _rows(table)
    assert "| setting |" in table.splitlines()[0] and len(lines) == 3
    assert "levels=global |" in lines[1] and "| 0.50 | 0.50 |" in lines[1]  # compared with the same AdamW row
    assert "levels=global+layer+head |" in lines[2] and "| 0.75 | 0.75 |" in lines[2]


def test_adamw_from_folders_that_differ_in_fop_options_is_one_row_and_seeds_count_once():
    finals = [_final("adamw", 0, 40, 3.0), _final("adamw", 0, 40, 3.0, levels=("global", "layer")),
              _final("adamw", 1, 60, 3.2, levels=("global", "layer")),
              _final("mlfop", 0, 20, 2.8, levels=("global", "layer")), _final("mlfop", 0, 30, 2.9)]
    rows = aggregate(finals)
    assert [(r["optimizer"], len(r["runs"])) for r in rows] == [("adamw", 2), ("mlfop", 1), ("mlfop", 1)]
    lines = _rows(markdown_table(rows, {"gen_nll": 3.0}))
    assert "| — | adamw |" in lines[0] and "| 50 ± 14 |" in lines[0]
    assert "levels=global+layer | mlfop |" in lines[1] and "| 0.40 |" in lines[1]
    assert group_label(rows[1]["runs"][0]) == "emu3 km64 b1024 mlfop[levels=global+layer] lr0.01"
    assert group_label(rows[2]["runs"][0]) == "emu3 km64 b1024 mlfop lr0.01"


def test_two_adamw_betas_are_two_rows_and_the_better_is_the_baseline():
    finals = [_final("adamw", 0, 40, 3.0, betas=(0.9, 0.95)), _final("adamw", 0, 80, 3.1, betas=(0.9, 0.999)),
              _final("soap", 0, 20, 2.9)]
    rows = aggregate(finals)
    lines = _rows(markdown_table(rows, {"gen_nll": 3.0}))
    assert "betas=0.9+0.95 | adamw" in lines[0] and "| 1.00 |" in lines[0]
    assert "betas=0.9+0.999 | adamw" in lines[1] and "| 2.00 |" in lines[1]
    assert "| 0.50 |" in lines[2]  # SOAP against the better AdamW
    assert group_label(rows[1]["runs"][0]) == "emu3 km64 b1024 adamw[betas=0.9+0.999] lr0.01"


def test_muon_rates_of_both_parts_are_rows():
    finals = [_final("muon", 0, 40, 3.0, lr=0.02, adamw_lr=a) for a in (1e-3, 3e-3)]
    rows = aggregate(finals)
    assert [r["adamw_lr"] for r in rows] == [1e-3, 3e-3]
    assert "| 0.02 (AdamW 0.003) |" in _rows(markdown_table(rows, {"gen_nll": 3.0}))[1]


def test_curves_show_each_optimizers_rates_with_the_most_seeds():
    sweep = [_final("adamw", 0, 40, 3.0, lr=lr) for lr in (1e-3, 3e-3)] + [
        _final("mlfop", 0, 40, 3.0, lr=lr) for lr in (1e-2, 3e-2)]
    seeds = [_final("adamw", s, 40, 3.0, lr=3e-3) for s in (1, 2)]
    kept = {(r["optimizer"], r["lr"]) for r in most_seeded(aggregate(sweep + seeds))}
    assert kept == {("adamw", 3e-3), ("mlfop", 1e-2), ("mlfop", 3e-2)}  # mlfop: a sweep alone, all rates


def test_best_rate_is_the_fewest_samples_then_the_lowest_loss_on_the_sweep_seed():
    interior = [_final("adamw", 0, steps, 3.0, lr=lr) for lr, steps in ((1e-3, 60), (3e-3, 40), (1e-2, 40))]
    interior[1]["gen_nll"] = 2.9  # the tie at 40 steps goes to the lower loss
    interior.append(_final("adamw", 1, 10, 2.0, lr=1e-2))  # another seed does not decide
    edge = [_final("soap", 0, steps, 3.0, lr=lr) for lr, steps in ((3e-4, None), (1e-3, 60), (3e-3, 50), (3e-2, 30))]
    unreached = [_final("upgrad", 0, None, loss, lr=lr) for lr, loss in ((1e-3, 3.0), (3e-3, 2.5), (1e-2, 2.8))]
    chosen = {sweep["best"]["optimizer"]: sweep for sweep in best_rates(aggregate(interior + edge + unreached))}
    assert chosen["adamw"]["best"]["lr"] == 3e-3 and chosen["adamw"]["edges"] == {}
    assert chosen["soap"]["best"]["lr"] == 3e-2 and chosen["soap"]["edges"] == {"lr": "highest"}
    assert chosen["upgrad"]["best"]["lr"] == 3e-3  # none at the target: the lowest loss decides
    table = best_rate_table(aggregate(interior + edge))
    adamw, soap = _rows(table)
    assert "| 0.001, 0.003, 0.01 | 0.003 | no (3 rates) |" in adamw
    assert "| 0.0003, 0.001, 0.003, 0.03 | 0.03 | lr highest: widen |" in soap


def test_stability_is_the_largest_rate_no_seed_diverged_or_stalled_at():
    finals = [_final("adamw", 0, 40, 3.0, lr=1e-3, clip=0.0), _final("adamw", 0, 40, 3.0, lr=3e-3, clip=0.0),
              _final("adamw", 0, None, 3.0, lr=1e-2, clip=0.0, flags=("stalled_und",)),
              _final("adamw", 1, 40, 3.0, lr=1e-2, clip=0.0),
              _final("adamw", 0, None, 3.0, lr=3e-2, clip=0.0, flags=("diverged",)),
              _final("adamw", 0, 40, 3.0, lr=1e-1, clip=0.0)]
    finals[4]["divergence"] = "exploded"
    finals += [_final("muon", 0, None, 3.0, lr=0.02, adamw_lr=3e-3, flags=("diverged",))]
    line, muon = _rows(stability_table(aggregate(finals)))
    assert "| 0 | 0.001: ok; 0.003: ok; 0.01: stalled_und 1/2; 0.03: diverged (exploded); 0.1: ok |" in line
    # the edge of the stable range, with a rate that holds again past the failures named
    assert line.endswith("| 0.003 (holds again at 0.1) | 0.01: stalled_und 1/2 |")
    assert "| none (AdamW 0.003) | 0.02: diverged |" in muon
    # a lowest rate that stalls was too slow, not unstable: the range starts at the first that held
    slow = _rows(stability_table(aggregate([{**finals[0], "stalled_gen": True}, *finals[1:6]])))[0]
    assert slow.endswith("| 0.003 (holds again at 0.1) | 0.01: stalled_und 1/2 |")
    no_high = _rows(stability_table(aggregate(finals[:5])))[0]
    assert no_high.endswith("| 0.003 | 0.01: stalled_und 1/2 |")


def test_overfitting_is_noted_but_not_a_stability_failure():
    finals = [_final("adamw", 0, 40, 3.0, lr=1e-3), _final("adamw", 0, 40, 3.4, lr=1e-2, flags=("overfit_gen",)),
              _final("adamw", 1, 40, 3.0, lr=1e-2)]
    line = _rows(stability_table(aggregate(finals)))[0]
    assert "| 0.001: ok; 0.01: ok (overfit_gen 1/2) | 0.01 | — |" in line


def test_claims_compare_each_row_with_the_best_adamw_and_muon_of_its_setting():
    def scored(fd, und_acc, *args, **changes):
        return _final(*args, **changes) | {"fd": fd, "und_acc": und_acc}

    finals = [scored(500.0, 0.70, "adamw", s, 40, 3.0 + s / 10, betas=(0.9, 0.95)) for s in (0, 1)]
    finals += [scored(100.0, 0.90, "adamw", s, 80, 3.0, betas=(0.9, 0.999)) for s in (0, 1)]
    finals += [scored(400.0, 0.75, "muon", s, 20, 2.9, lr=0.02, adamw_lr=3e-3) for s in (0, 1)]
    finals += [scored(300.0, 0.80, "mlfop", 0, 10, 2.8), scored(300.0, None, "mlfop", 1, None, 2.6)]
    # another setting, where no AdamW row reaches the target: the lower losses decide; no Muon row
    finals += [scored(200.0, 0.5, "adamw", 0, None, g, lr=lr, text_stream=True) for lr, g in ((1e-3, 3.5), (3e-3, 3.2))]
    finals += [scored(50.0, 0.6, "soap", 0, 30, 2.7, text_stream=True)]
    adamw, _, muon, mlfop, _, _, soap = _rows(claims_table(aggregate(finals)))
    # the references are the fastest rows (betas 0.9, 0.95; not the one with the better FD)
    assert adamw.endswith("| 1.00 | 1.00 | 1.00 | +0.000 | +0.000 | 2.00 | 2.00 | 1.25 | -0.050 | +0.150 |")
    assert muon.endswith("| 0.50 | 0.50 | 0.80 | +0.050 | -0.150 | 1.00 | 1.00 | 1.00 | +0.000 | +0.000 |")
    # one seed short of the target: no samples ratio; accuracy of one seed only: no difference
    assert mlfop.endswith("| 0.01 | 2 | — | — | 0.60 | — | -0.350 | — | — | 0.75 | — | -0.200 |")
    assert soap.endswith("| soap | 0.01 | 1 | — | — | 0.25 | +0.100 | -0.500 |" + " — |" * 5)


def test_stability_outcomes_give_each_seeds_peak_training_loss_in_seed_order():
    finals = [_final("adamw", 1, None, 3.0, lr=1e-1, clip=0.0, flags=("diverged",)),
              _final("adamw", 0, 40, 3.0, lr=1e-1, clip=0.0), _final("adamw", 0, 40, 3.0, lr=1e-2, clip=0.0)]
    finals[0] |= {"divergence": "exploded", "peak_loss_ratio": 2.345}
    finals[1]["peak_loss_ratio"] = 1.5
    line = _rows(stability_table(aggregate(finals)))[0]
    assert "| 0.01: ok; 0.1: diverged (exploded) 1/2 (peak ×1.50, 2.35) |" in line  # none known: nothing
    finals[0]["run_above_line"], finals[1]["run_above_line"] = 3, 0  # seed 1 spent 3 steps above the line
    line = _rows(stability_table(aggregate(finals)))[0]
    assert "0.1: diverged (exploded) 1/2 (peak ×1.50, 2.35; steps in a row above the line: 0, 3) |" in line
