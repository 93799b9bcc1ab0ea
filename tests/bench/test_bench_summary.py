"""The result table: seeds grouped by setting, spreads, ratios to AdamW, settings spelled out."""

from mlfop.bench.config import RunConfig
from mlfop.bench.summary import aggregate, group_label, markdown_table, most_seeded, setting


def _final(optimizer, seed, steps, gen_nll, **changes):
    config = RunConfig(**changes).to_dict() | {"seeds": [seed]}
    return {"optimizer": optimizer, "lr": 1e-2, "seed": seed, "gen_nll": gen_nll, "steps_to_all": steps,
            "seconds_to_all": None if steps is None else steps / 10, "seconds_per_step": 0.1,
            "setting": setting(config, optimizer)}


def test_seeds_group_and_ratios_use_adamw():
    finals = [_final("adamw", 0, 40, 3.0), _final("adamw", 1, 60, 3.2), _final("mlfop", 0, 25, 2.8),
              _final("mlfop", 1, None, 2.9)]
    rows = aggregate(finals)
    assert [(r["optimizer"], len(r["runs"])) for r in rows] == [("adamw", 2), ("mlfop", 2)]
    table = markdown_table(rows, {"gen_nll": 3.0})
    adamw, mlfop = [line for line in table.splitlines() if line.startswith("| emu3")]
    assert "3.100 ± 0.141" in adamw and "| 50 ± 14 |" in adamw and "| 1.00 | 1.00 |" in adamw
    assert "25 ± 0 (1/2)" in mlfop and "| — | — |" in mlfop  # one seed missed the target: no ratio
    assert "setting" not in table.splitlines()[0]


def test_different_settings_are_separate_rows_with_a_setting_column():
    finals = [_final("adamw", 0, 40, 3.0), _final("mlfop", 0, 20, 2.8, levels=("global",)),
              _final("mlfop", 0, 30, 2.9)]
    table = markdown_table(aggregate(finals), {"gen_nll": 3.0})
    lines = [line for line in table.splitlines() if line.startswith("| emu3")]
    assert "| setting |" in table.splitlines()[0] and len(lines) == 3
    assert "levels=global |" in lines[1] and "| 0.50 |" in lines[1]  # compared with the same AdamW row
    assert "levels=global+layer+head |" in lines[2] and "| 0.75 |" in lines[2]


def test_adamw_from_folders_that_differ_in_fop_options_is_one_row_and_seeds_count_once():
    finals = [_final("adamw", 0, 40, 3.0), _final("adamw", 0, 40, 3.0, levels=("global", "layer")),
              _final("adamw", 1, 60, 3.2, levels=("global", "layer")),
              _final("mlfop", 0, 20, 2.8, levels=("global", "layer")), _final("mlfop", 0, 30, 2.9)]
    rows = aggregate(finals)
    assert [(r["optimizer"], len(r["runs"])) for r in rows] == [("adamw", 2), ("mlfop", 1), ("mlfop", 1)]
    lines = [line for line in markdown_table(rows, {"gen_nll": 3.0}).splitlines() if line.startswith("| emu3")]
    assert "| — | adamw |" in lines[0] and "| 50 ± 14 |" in lines[0]
    assert "levels=global+layer | mlfop |" in lines[1] and "| 0.40 |" in lines[1]
    assert group_label(rows[1]["runs"][0]) == "emu3 km64 b1024 mlfop[global+layer] lr0.01"
    assert group_label(rows[2]["runs"][0]) == "emu3 km64 b1024 mlfop lr0.01"


def test_curves_show_each_optimizers_rates_with_the_most_seeds():
    def run(optimizer, lr, seed, **changes):
        return {**_final(optimizer, seed, 40, 3.0, **changes), "lr": lr}

    sweep = [run("adamw", lr, 0) for lr in (1e-3, 3e-3)] + [run("mlfop", lr, 0) for lr in (1e-2, 3e-2)]
    seeds = [run("adamw", 3e-3, s) for s in (1, 2)]
    kept = {(r["optimizer"], r["lr"]) for r in most_seeded(aggregate(sweep + seeds))}
    assert kept == {("adamw", 3e-3), ("mlfop", 1e-2), ("mlfop", 3e-2)}  # mlfop: a sweep alone, all rates
