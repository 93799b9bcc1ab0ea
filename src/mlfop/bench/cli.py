"""The ``mlfop-bench`` command: ``run`` (train and compare optimizers) and ``report`` (aggregate).

Every ``run`` option is a field of :class:`mlfop.bench.config.RunConfig`; precedence is
defaults < ``--config FILE`` (TOML or YAML) < command-line flags. Bad input is one line on
stderr and exit code 2, checked before anything is written. Ctrl-C (or SIGTERM) stops a run
with one line saying whether its folder is resumable and how (exit code 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mlfop.bench.config import (METRICS, OPTIMIZERS, BenchError, RunConfig, config_from, load_config_file,
                                saved_config)
from mlfop.bench.report import check_report_input, write_report
from mlfop.bench.runfolder import RunFolder, check_output, partial_path
from mlfop.bench.runner import run_benchmark

__all__ = ["main"]

_HELP = {
    "model": "emu3 or janus",
    "tokenizer": "km64 (2x2 k-means, 16 tokens) or pix8 (per pixel, 64 tokens)",
    "optimizers": f"any of {' '.join(OPTIMIZERS)}",
    "lrs": ("learning rates of one optimizer, e.g. --lrs soap=3e-3,1e-2 (repeatable; a sweep; "
             "muon, fop-muon: their Muon part)"),
    "batch": "sequences per optimizer step",
    "micro_batch": "sequences per forward/backward (must divide --batch)",
    "steps": "optimizer steps per run",
    "train_samples": "budget in training sequences, a multiple of --batch; sets the steps (instead of --steps)",
    "seeds": "one run per seed",
    "targets": "held-out target, e.g. --targets gen_nll=3.0 --targets und_acc=0.7 (repeatable)",
    "threads": "torch CPU threads",
    "output": "run folder (default runs/<date>-<time>-<model>-<tokenizer>)",
    "eval_every": "steps between held-out evaluations",
    "samples": "class-conditional samples for the Frechet distance (0: skip)",
    "text_stream": "add the text-only third stream (K = 3)",
    "mix": "micro-batch ratio gen und text",
    "loss_weighting": "task (streams weighted by their micro-batch share) or token (mean over all tokens)",
    "augment": "+-1 pixel shift augmentation",
    "warmup_fraction": "share of steps of linear warm-up",
    "min_lr_fraction": "cosine decay floor, as a fraction of the peak LR",
    "clip": "gradient-norm clip (0: none)",
    "diverge_factor": "stop a run as diverged once a stream's train loss has exceeded this times its first for "
                      "--diverge-patience consecutive steps (0: never, and the run diverges only on a non-finite "
                      "loss, which always stops it, or a held-out loss that ends above its start)",
    "diverge_patience": "consecutive steps above the --diverge-factor line that stop a run (1: the first, so a "
                        "one-step spike the run would recover from counts as a divergence too)",
    "probe_every": "steps between per-layer gen/und gradient heterogeneity probes (0: none)",
    "betas": "beta1 beta2 of every Adam-type optimizer (muon, fop-muon: their AdamW part)",
    "weight_decay": "decoupled weight decay of every Adam-type optimizer (muon, fop-muon: their AdamW part)",
    "levels": "ML-FOP-SOAP levels, any of global layer head (ablation; none: SOAP on the summed gradient with the "
              "streams' curvature statistics)",
    "stream_weights": "ML-FOP-SOAP stream weights: tokens, fixed or balanced",
    "fold_tokens": "ML-FOP-SOAP: pass loss-token counts to fold() even when the objective weights streams "
                   "by micro-batches (then a stream's folded gradient is no longer grad L_k)",
    "stream_statistics": "ML-FOP-SOAP: Kronecker factors from the streams (--no-stream-statistics: from the "
                         "shared component)",
    "noise_shrinkage": "ML-FOP-SOAP: shrink each correction by its sampling-noise share",
    "beta_max": "ML-FOP-SOAP: bound on the correction coefficients |beta| (ablation)",
    "eta_range": "ML-FOP-SOAP: low high bounds of the step scale eta* (1 1: no scaling; ablation)",
    "state_dtype": "SOAP and ML-FOP-SOAP: dtype of the moments, float32 or bfloat16 (factors and bases stay float32)",
    "outer_lr": "rate of the parameters outside the hidden matrices (embeddings, heads, 1-D, convolutions) for "
                "the one-optimizer contenders, Muon's split given to them (0: their own rate)",
    "muon_adamw_lrs": "learning rates of Muon's AdamW part (embeddings, heads, 1-D); a sweep axis",
    "muon_adjust_lr": "torch.optim.Muon's adjust_lr_fn: original or match_rms_adamw",
    "muon_weight_decay": "weight decay of Muon's Muon part",
    "muon_ns_steps": "Newton-Schulz iterations of Muon",
    "famo_lr": "FAMO: learning rate of its task-weight logits",
    "famo_weight_decay": "FAMO: weight decay of its task-weight logits",
    "hidden": "trunk width",
    "layers": "trunk layers",
    "heads": "attention heads",
    "mlp": "MLP width",
    "attention_dropout": "attention dropout",
}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see mlfop-bench {self.prog.split()[-1]} --help)")


def _fail(message: str) -> NoReturn:
    print(f"mlfop-bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _pairs(kind: type):
    """Parser of ``KEY=VALUE`` (``kind`` float) or ``KEY=V1,V2`` (``kind`` tuple) arguments."""
    def parse(text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
        try:
            return key, tuple(float(v) for v in value.split(",")) if kind is tuple else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number in {text!r}") from None
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlfop-bench", description="Train tiny Emu3/Janus on digits with AdamW, SOAP, Muon, "
                     "ML-FOP-SOAP, UPGrad and FAMO; compare them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="train and compare (no arguments: the default benchmark)")
    run.add_argument("--config", help="TOML or YAML file of RunConfig keys (flags override it)")
    run.add_argument("--resume", action="store_true", help="continue the killed run in --output")
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        flag, default = "--" + field.name.replace("_", "-"), getattr(defaults, field.name)
        options: dict[str, Any] = {"default": None, "help": f"{_HELP[field.name]} (default: {default})"}
        if field.name in ("lrs", "targets"):
            options.update(action="append", type=_pairs(tuple if field.name == "lrs" else float), metavar="KEY=VALUE")
        elif isinstance(default, bool):
            options.update(action=argparse.BooleanOptionalAction)
        elif isinstance(default, tuple):
            options.update(nargs="*" if field.name == "levels" else "+", type=type(default[0]))
        else:
            options.update(type=type(default))
        run.add_argument(flag, dest=field.name, **options)
    report = commands.add_parser("report", help="aggregate run folders over seeds")
    report.add_argument("directories", nargs="+", metavar="DIR[:OPT,...]",
                        help="run folders, or folders holding them (a study's root); DIR:adamw,soap takes only "
                             "those optimizers' runs")
    report.add_argument("--output", default="mlfop-report", help="report folder (default: mlfop-report)")
    report.add_argument("--targets", action="append", type=_pairs(float), metavar="KEY=VALUE",
                        help="held-out targets for the time-to-target columns, e.g. --targets gen_nll=2.5 "
                             f"(repeatable; {', '.join(METRICS)}; default: those the runs were given)")
    return parser


def _run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < config file < flags; validated. With --resume, the interrupted run's own config."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    for name, value in flags.items():
        flags[name] = dict(value) if name in ("lrs", "targets") else tuple(value) if isinstance(value, list) else value
    if args.resume:
        extra = sorted(set(flags) - {"output"}) + (["config"] if args.config else [])
        if "output" not in flags or extra:
            raise BenchError("--resume takes only --output DIR (the run folder of the killed run); it reuses "
                             f"that run's config{', got ' + ', '.join(extra) if extra else ''}")
        check_output(Path(flags["output"]), resume=True)
        saved = RunFolder(partial_path(Path(flags["output"]))).read_json("config.json")
        # the same folder, possibly named from another directory
        return saved_config(saved, output=flags["output"])
    values = load_config_file(args.config) if args.config else {}
    values.update(flags)
    config = config_from(values)
    if not config.output:
        config.output = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{config.tokenizer}"
    config.validate()
    check_output(Path(config.output), resume=False)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mlfop-bench``; returns the exit code (2 on bad input, 130 when interrupted)."""
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "run":
            config = _run_config(args)
            try:
                run_benchmark(config, resume=args.resume)
            except KeyboardInterrupt:
                _stopped(Path(config.output))
        else:
            targets = dict(args.targets) if args.targets else None
            check_report_input(args.directories, args.output, targets)
            try:
                print(write_report(args.directories, args.output, targets))
            except KeyboardInterrupt:
                _stopped(None)
    except BenchError as error:
        _fail(str(error))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def _stopped(output: Path | None) -> NoReturn:
    """One line on what an interrupt left, then exit code 130."""
    if output is None:
        message = "interrupted; no report written"
    elif (partial_path(output) / "config.json").is_file():
        message = (f"interrupted; {partial_path(output)} is resumable: "
                   f"mlfop-bench run --resume --output {shlex.quote(str(output))}")
    else:
        message = "interrupted before the run started (nothing worth keeping); run the same command again"
    print(f"mlfop-bench: {message}", file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":
    raise SystemExit(main())
