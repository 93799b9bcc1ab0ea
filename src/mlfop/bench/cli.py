"""The ``mlfop-bench`` command: ``run`` (train and compare optimizers) and ``report`` (aggregate).

Every ``run`` option is a field of :class:`mlfop.bench.config.RunConfig`; precedence is
defaults < ``--config FILE`` (TOML or YAML) < command-line flags. Bad input is one line on
stderr and exit code 2, checked before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mlfop.bench.config import BenchError, RunConfig, check_output, load_config_file, partial_path
from mlfop.bench.report import check_report_input, write_report
from mlfop.bench.runfolder import RunFolder
from mlfop.bench.runner import run_benchmark

__all__ = ["main"]

_HELP = {
    "model": "emu3 or janus",
    "tokenizer": "km64 (2x2 k-means, 16 tokens) or pix8 (per pixel, 64 tokens)",
    "optimizers": "any of adamw soap mlfop upgrad",
    "lrs": "learning rates of one optimizer, e.g. --lrs soap=3e-3,1e-2 (repeatable; a sweep)",
    "batch": "sequences per optimizer step",
    "micro_batch": "sequences per forward/backward (must divide --batch)",
    "steps": "optimizer steps per run",
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
    "betas": "beta1 beta2 of every optimizer",
    "weight_decay": "decoupled weight decay of every optimizer",
    "levels": "ML-FOP-SOAP levels, any of global layer head (ablation)",
    "stream_weights": "ML-FOP-SOAP stream weights: tokens, fixed or balanced",
    "fold_tokens": "ML-FOP-SOAP: pass loss-token counts to fold() even when the objective weights streams "
                   "by micro-batches (then a stream's folded gradient is no longer grad L_k)",
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
    parser = _Parser(prog="mlfop-bench", description="Train tiny Emu3/Janus on digits with AdamW, SOAP, "
                     "ML-FOP-SOAP and UPGrad; compare them.")
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
            options.update(nargs="+", type=type(default[0]))
        else:
            options.update(type=type(default))
        run.add_argument(flag, dest=field.name, **options)
    report = commands.add_parser("report", help="aggregate run folders over seeds")
    report.add_argument("directories", nargs="+", metavar="DIR[:OPT,...]",
                        help="run folders; DIR:adamw,soap takes only those optimizers' runs from DIR")
    report.add_argument("--output", default="mlfop-report", help="report folder (default: mlfop-report)")
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
        values = {k: _from_json(v) for k, v in saved.items()}
        values["output"] = flags["output"]  # the same folder, possibly named from another directory
        return RunConfig(**values).validate()
    values = load_config_file(args.config) if args.config else {}
    values.update(flags)
    config = RunConfig(**values)
    if not config.output:
        config.output = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{config.tokenizer}"
    config.validate()
    check_output(Path(config.output), resume=False)
    return config


def _from_json(value: Any) -> Any:
    """JSON lists back to tuples (and inside the lrs table)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mlfop-bench``; returns the exit code (2 on bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            run_benchmark(_run_config(args), resume=args.resume)
        else:
            check_report_input(args.directories, args.output)
            print(write_report(args.directories, args.output))
    except BenchError as error:
        _fail(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
