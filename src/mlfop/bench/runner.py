"""``mlfop-bench run``: every (optimizer, lr, seed) of a config, then the table, plots and summary.

Everything is written under ``<output>.partial`` and the folder is renamed to ``<output>`` only
when all runs, plots and the summary are done; ``--resume`` continues a killed invocation from
its partial folder (finished runs are kept, the interrupted one restarts from its checkpoint).
See :mod:`mlfop.bench.runfolder` for what a kill at each point leaves.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from mlfop.bench.config import MUON_BASED, RunConfig
from mlfop.bench.data import DigitsData, load_split
from mlfop.bench.loop import RunSpec, train
from mlfop.bench.metrics import references
from mlfop.bench.models import build_model
from mlfop.bench.objective import make_plan
from mlfop.bench.plots import plot_losses, plot_samples
from mlfop.bench.runfolder import RunFolder, kill_point, partial_path
from mlfop.bench.summary import aggregate, markdown_table, setting
from mlfop.bench.tokenizers import load_tokenizer, make_tokenizer

__all__ = ["run_benchmark", "run_specs"]


def run_specs(config: RunConfig) -> list[RunSpec]:
    """Every optimizer at each of its learning rates (Muon: with each rate of its AdamW part), for
    every seed (seed-major order)."""
    return [RunSpec(name, lr, seed, adamw_lr) for seed in config.seeds for name in config.optimizers
            for lr in config.learning_rates(name)
            for adamw_lr in (config.muon_adamw_lrs if name in MUON_BASED else (None,))]


def run_benchmark(config: RunConfig, resume: bool = False) -> str:
    """Run (or resume) the invocation described by a validated ``config``; returns the table."""
    output = Path(config.output)
    folder = RunFolder(partial_path(output))
    with folder.writing(fresh=not resume):
        torch.set_num_threads(config.threads)
        train_split, test_split = load_split()
        if resume:
            tokenizer = load_tokenizer(folder.root / "tokenizer.npz")
        else:
            tokenizer = make_tokenizer(config.tokenizer, train_split.images)
            folder.write("tokenizer.npz", tokenizer.save)
            folder.write_json("config.json", config.to_dict())  # written last: from here on resumable
        data = DigitsData(train_split, test_split, tokenizer, config.augment)
        refs = references(data, config.samples)
        folder.write_json("references.json", refs)
        plan = make_plan(config, tokenizer.tokens)
        _print_header(config, data, refs)
        finished = {r["run"] for r in folder.records("final")}
        for spec in run_specs(config):
            if spec.name not in finished:
                train(spec, config, data, plan, refs, folder, resume)
        finals = [{**r, "setting": setting(config.to_dict(), r["optimizer"])} for r in folder.records("final")]
        table = markdown_table(aggregate(finals), config.targets)
        _write_figures(folder, refs)
        kill_point("figures")
        _write_summary(folder, config, refs, table)
        folder.finish(output)
    print(table)
    print(_reference_line(refs))
    print(f"\nrun folder: {output}")
    return table


def _print_header(config: RunConfig, data: DigitsData, refs: dict[str, float]) -> None:
    counts = build_model(config.model, config.model_config, data.tokenizer.codes, data.tokenizer.tokens
                         ).parameter_counts()
    frozen = f", {counts['frozen']:,} frozen (VQ model, not optimized)" if counts["frozen"] else ""
    print(f"model {config.model}: {counts['trainable']:,} trainable parameters{frozen}; tokenizer "
          f"{config.tokenizer} ({data.tokenizer.tokens} tokens of {data.tokenizer.codes} codes)")
    print(f"step: batch {config.batch} = micro-batches of {config.micro_batch}: "
          + ", ".join(f"{n} x {k}" for k, n in config.micro_batches().items())
          + f"; {config.threads} thread(s)")
    print(_reference_line(refs))


def _reference_line(refs: dict[str, float]) -> str:
    line = (f"Lines to beat: gen NLL of the independent sampler {refs['independent_sampler_nll']:.3f} "
            f"(unigram prior {refs['gen_prior_nll']:.3f}, ln K {refs['ln_codes']:.3f}); answer NLL prior "
            f"{refs['und_prior_nll']:.3f}")
    return line + (f"; FD noise floor {refs['fd_noise_floor']:.1f}." if "fd_noise_floor" in refs else ".")


def _write_figures(folder: RunFolder, refs: dict[str, float]) -> None:
    folder.write("losses.png", partial(plot_losses, folder.records(), refs))
    for path in sorted((folder.root / "samples").glob("*.npy")):
        folder.write(f"samples_{path.stem}.png", partial(plot_samples, np.load(path), f"samples: {path.stem}"))


def _write_summary(folder: RunFolder, config: RunConfig, refs: dict[str, float], table: str) -> None:
    grids = "\n".join(f"![{p.stem}]({p.name})" for p in sorted(folder.root.glob("samples_*.png")))
    lines = [
        f"# mlfop-bench run: {config.model} on {config.tokenizer}",
        "",
        f"Batch {config.batch} (micro-batches of {config.micro_batch}), {config.steps} steps, seeds "
        f"{list(config.seeds)}, {config.threads} thread(s). Full configuration: `config.json`.",
        "",
        _reference_line(refs) + " The independent sampler models no dependency between codes; the FD noise "
        "floor is the distance of as many real training images to the test images.",
        "",
        table,
        "",
        "![losses](losses.png)",
        "",
        grids,
        "",
    ]
    folder.write("summary.md", lambda handle: handle.write("\n".join(lines).encode()))
