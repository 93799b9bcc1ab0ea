"""Step-time benchmark: ``mlfop.SOAP`` and ``mlfop.MLFOPSOAP`` beside AdamW and other SOAPs.

Every contender trains its own deep copy of the same small GPT-style decoder on the same random
token batches, each global batch accumulated from ``--micro-batches`` micro-batches. The
ML-FOP-SOAP contenders fold every micro-batch into one of 2 (``mlfop_fop_k2``) or 3
(``mlfop_fop_k3``) streams, round robin, so their forward+backward time includes the folding. The contenders run **interleaved step by step in one process**, and the order is
rotated every round, so that noise from the (shared) machine hits all of them alike.

Per train step we time, with ``time.perf_counter`` (wall) and ``time.process_time`` (CPU time of
all threads), the forward+backward part (``zero_grad`` + forward + loss + ``backward``) and the
optimizer step (``opt.step()``) separately. From the measured window (after ``--warmup`` calls)
we report, per optimizer:

* step median over the calls that do not refresh the eigenbasis, and the mean over those that do;
* amortised step ``(1 - 1/f) * median + (1/f) * mean refresh`` (``f`` = precondition frequency;
  AdamW: the median);
* amortised full step = amortised step + median forward+backward time;
* bytes of every tensor in ``optimizer.state``, the final loss, and the ratios to the baseline
  (``mlfop`` by default).

Run ``python benchmarks/step_time.py --help`` for the options. The output is a Markdown table
that can be pasted into ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Set before torch loads OpenMP: with the default active spin-wait, every parallel op stalls
# while another process holds the second core (measured 4x slower steps on a shared 2-core
# machine, shared/research/miniature-models-and-data.md §3.6). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CONTENDERS = ("adamw", "pytorch_optimizer", "heavyball", "mlfop_soap", "mlfop_fop_k2", "mlfop_fop_k3")
DEFAULT_CONTENDERS = ("adamw", "pytorch_optimizer", "heavyball", "mlfop_soap", "mlfop_fop_k2")
# ML-FOP-SOAP variants: "mlfop_fop_k2+heads" (head level on the detected attention heads),
# "+diag=off|global|block|head" (diagnostics detail; default global), "+noshrink",
# "+sharedstats" (Kronecker factors from the shared component only); for mlfop_soap too:
# "+bf16state" (bfloat16 moments), "+compile" (torch.compile(opt.step), inductor).
FOP_OPTIONS = ("heads", "noshrink", "sharedstats", "diag", "bf16state", "compile")
SOAP_OPTIONS = ("bf16state", "compile")
LR = 3e-3
BETAS = (0.95, 0.95)
WEIGHT_DECAY = 0.01
MAX_PRECOND_DIM = 10000
HEAVYBALL_SHAMPOO_BETA = 0.95  # heavyball needs an explicit value; the others use beta2 = 0.95
QUICK = {"d_model": 64, "layers": 2, "heads": 4, "vocab": 128, "seq": 16, "batch": 8,
         "micro_batches": 2, "warmup": 12, "steps": 4, "precondition_frequency": 4}
STREAMS = ("image", "text", "text_only")
OFFICIAL_REFRESH_RULE = "refresh = calls k > 1 with (k - 1) % f == 0"


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention (fused qkv) and a GELU MLP.

    ``num_heads`` and ``head_dim`` are the attributes ``mlfop.detect_head_layouts`` reads.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = d_model // heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, d_model))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only language model: token + learned position embeddings, blocks, untied head."""

    def __init__(self, vocab: int, seq: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Llama(nn.Module):
    """transformers' ``LlamaForCausalLM`` (q/k/v/o attention, SwiGLU MLP, RMSNorm), untied head."""

    def __init__(self, vocab: int, seq: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=3 * d_model,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=seq, tie_word_embeddings=False, attn_implementation="sdpa")
        self.hf = LlamaForCausalLM(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens).logits


MODELS = {"gpt": GPT, "llama": Llama}
# The accumulated-batch settings of the Core v2 issue: a ~1.1M-parameter Llama, 128 sequences of
# 64 tokens per step, in 8 micro-batches of 16 or 32 of 4.
PRESETS = {
    "accumulate8": {"model": "llama", "d_model": 128, "layers": 4, "heads": 4, "vocab": 1024, "seq": 64,
                    "batch": 128, "micro_batches": 8},
    "accumulate32": {"model": "llama", "d_model": 128, "layers": 4, "heads": 4, "vocab": 1024, "seq": 64,
                     "batch": 128, "micro_batches": 32},
}


def make_batches(args: argparse.Namespace, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (input, target) pairs of random tokens from a generator seeded with ``--seed``."""
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(args.vocab, (args.batch, args.seq + 1), generator=generator).to(args.device)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Contender:
    """One optimizer with its own model copy and the timings of all its calls."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    frequency: int | None  # precondition frequency; None for AdamW
    refresh_rule: str
    is_refresh: Callable[[int], bool]  # asked right after call k (1-based) returned
    streams: tuple[str, ...] = ()  # fold micro-batch i into streams[i % K] (ML-FOP-SOAP only)
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def call_index_rule(frequency: int) -> Callable[[int], bool]:
    """Refresh test of the official SOAP schedule: calls f+1, 2f+1, ... (call 1 only initialises)."""
    return lambda k: k > 1 and (k - 1) % frequency == 0


def build_adamw(model: nn.Module, args: argparse.Namespace) -> Contender:
    """``torch.optim.AdamW`` with the shared hyper-parameters (no basis, never refreshes)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return Contender("adamw", model, opt, None, "no refresh", lambda k: False)


def build_pytorch_optimizer(model: nn.Module, args: argparse.Namespace) -> Contender:
    """``pytorch_optimizer.SOAP`` (a port of the official code); same refresh calls as official."""
    import pytorch_optimizer

    opt = pytorch_optimizer.SOAP(
        model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
        precondition_frequency=args.precondition_frequency,
        max_precondition_dim=MAX_PRECOND_DIM, merge_dims=False,
    )
    f = args.precondition_frequency
    return Contender("pytorch_optimizer", model, opt, f, OFFICIAL_REFRESH_RULE, call_index_rule(f))


def build_heavyball(model: nn.Module, args: argparse.Namespace) -> Contender:
    """``heavyball.SOAP`` with our hyper-parameters instead of its own defaults.

    heavyball accumulates ``1/f`` per call in floating point and refreshes when the integer part
    grows, which drifts from the official calls (f=10: 11, 20, 30, ...). Its refresh calls are
    therefore taken from its own per-call flag ``_is_preconditioning``.
    """
    import heavyball

    if not args.heavyball_compile:
        heavyball.utils.compile_mode = None
    opt = heavyball.SOAP(
        model.parameters(), lr=LR, betas=BETAS, shampoo_beta=HEAVYBALL_SHAMPOO_BETA,
        weight_decay=WEIGHT_DECAY, precondition_frequency=args.precondition_frequency,
        max_precond_dim=MAX_PRECOND_DIM, merge_dims=False,
    )
    rule = "refresh = calls heavyball flags itself (its `_is_preconditioning`)"
    return Contender("heavyball", model, opt, args.precondition_frequency, rule,
                     lambda k: bool(opt._is_preconditioning))


def fop_options(name: str) -> tuple[str, dict[str, Any]]:
    """Split ``mlfop_fop_k2+heads+diag=block`` into the base name and MLFOPSOAP keyword options."""
    base, *options = name.split("+")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key == "heads":
            kwargs["heads"] = True
        elif key == "noshrink":
            kwargs["noise_shrinkage"] = False
        elif key == "sharedstats":
            kwargs["stream_statistics"] = False
        elif key == "diag" and value:
            kwargs["diagnostics"] = value
        elif key == "bf16state":
            kwargs["state_dtype"] = "bfloat16"
        elif key == "compile":
            kwargs["compile"] = True
        else:
            raise ValueError(f"unknown ML-FOP-SOAP option {option!r} in {name!r}; use {FOP_OPTIONS}")
    return base, kwargs


def contender_name(text: str) -> str:
    """argparse type: a known contender, or an ML-FOP-SOAP one with +options."""
    base, options = fop_options(text)
    soap_only = set(options) <= {"state_dtype", "compile"}
    if base not in CONTENDERS or (text != base and not (base.startswith("mlfop_fop") or
                                                        (base == "mlfop_soap" and soap_only))):
        raise argparse.ArgumentTypeError(f"unknown contender {text!r}; choose from {CONTENDERS} "
                                         f"(ML-FOP-SOAP ones may add +{', +'.join(FOP_OPTIONS)}=LEVEL, "
                                         f"mlfop_soap +{', +'.join(SOAP_OPTIONS)})")
    return text


def build_mlfop(streams: int, options: dict[str, Any] | None = None, label: str = "") -> Callable[[nn.Module, argparse.Namespace], Contender]:
    """``mlfop.SOAP`` (``streams=0``) or ``mlfop.MLFOPSOAP`` folding into ``streams`` streams."""

    def build(model: nn.Module, args: argparse.Namespace) -> Contender:
        import mlfop

        common = dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                      precondition_frequency=args.precondition_frequency,
                      max_precond_dim=MAX_PRECOND_DIM, merge_dims=False)
        extra = dict(options or {})
        compiled = extra.pop("compile", False)
        if streams:
            names = STREAMS[:streams]
            if extra.pop("heads", False):
                extra["heads"] = model
            opt = mlfop.MLFOPSOAP(model.parameters(), streams=names, **common, **extra)
            name = label or f"mlfop_fop_k{streams}"
        else:
            names = ()
            opt = mlfop.SOAP(model.parameters(), **common, **extra)
            name = label or "mlfop_soap"
        if compiled:
            opt.step = torch.compile(opt.step)
        f = args.precondition_frequency
        return Contender(name, model, opt, f, OFFICIAL_REFRESH_RULE, call_index_rule(f), names)

    return build


BUILDERS: dict[str, Callable[[nn.Module, argparse.Namespace], Contender]] = {
    "adamw": build_adamw,
    "pytorch_optimizer": build_pytorch_optimizer,
    "heavyball": build_heavyball,
    "mlfop_soap": build_mlfop(0),
    "mlfop_fop_k2": build_mlfop(2),
    "mlfop_fop_k3": build_mlfop(3),
}
OPTIONAL = {"pytorch_optimizer", "heavyball"}  # skipped with a note when not installed


def build_contenders(base: nn.Module, args: argparse.Namespace) -> tuple[list[Contender], list[str]]:
    """One contender per selected optimizer, each on a deep copy of ``base``; plus notes."""
    contenders, notes = [], []
    for name in args.optimizers:
        base_name, options = fop_options(name)
        if name in BUILDERS:
            builder = BUILDERS[name]
        else:  # an ML-FOP-SOAP or mlfop_soap variant
            builder = build_mlfop(0 if base_name == "mlfop_soap" else int(base_name[-1]), options, name)
        try:
            contenders.append(builder(copy.deepcopy(base), args))
        except ModuleNotFoundError as err:
            if name not in OPTIONAL:
                raise SystemExit(f"{name} is required but not importable ({err}); "
                                 "install the package, e.g. `pip install -e .`") from err
            notes.append(f"{name}: skipped, not installed ({err})")
    return contenders, notes


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timers read the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(contender: Contender, batch: tuple[torch.Tensor, torch.Tensor], micro_batches: int) -> None:
    """One full train step; records wall and CPU time of forward+backward (with the folds,
    over all micro-batches) and of the optimizer step, and on CUDA the step's peak memory."""
    inputs, targets = batch
    device = inputs.device
    synchronize(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    contender.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (x, y) in enumerate(zip(inputs.chunk(micro_batches), targets.chunk(micro_batches))):
        loss = F.cross_entropy(contender.model(x).flatten(0, 1), y.flatten()) / micro_batches
        loss.backward()
        if contender.streams:
            contender.optimizer.fold(contender.streams[i % len(contender.streams)])
        total += loss.detach()
    synchronize(device)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    contender.optimizer.step()
    synchronize(device)
    wall2, cpu2 = time.perf_counter(), time.process_time()
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    k = len(contender.calls) + 1
    contender.calls.append({
        "call": k,
        "refresh": contender.is_refresh(k),
        "fwd_bwd_ms": 1e3 * (wall1 - wall0),
        "step_ms": 1e3 * (wall2 - wall1),
        "fwd_bwd_cpu_ms": 1e3 * (cpu1 - cpu0),
        "step_cpu_ms": 1e3 * (cpu2 - cpu1),
        "step_peak_bytes": peak,
        "loss": float(total),
    })


def run_interleaved(contenders: Sequence[Contender], batches: Sequence[Any], micro_batches: int) -> None:
    """Round r: every contender does train step r, starting at contender r mod n."""
    n = len(contenders)
    for round_index, batch in enumerate(batches):
        shift = round_index % n
        for contender in [*contenders[shift:], *contenders[:shift]]:
            train_step(contender, batch, micro_batches)


def tensor_bytes(obj: Any) -> int:
    """Sum of ``nbytes`` of every tensor in ``obj``, recursing into dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item) for item in obj)
    return 0


def summarise(contender: Contender, warmup: int) -> dict[str, Any]:
    """Statistics over the measured calls (those after ``warmup``) of one contender."""
    measured = contender.calls[warmup:]
    regular = [c for c in measured if not c["refresh"]]
    refresh = [c for c in measured if c["refresh"]]
    step_median = statistics.median(c["step_ms"] for c in regular)
    fwd_bwd_median = statistics.median(c["fwd_bwd_ms"] for c in measured)
    refresh_mean = statistics.fmean(c["step_ms"] for c in refresh) if refresh else None
    if contender.frequency is None:
        amortised = step_median
    elif refresh_mean is None:
        amortised = None  # no refresh inside the window: nothing to amortise honestly
    else:
        share = 1 / contender.frequency
        amortised = (1 - share) * step_median + share * refresh_mean
    return {
        "optimizer": contender.name,
        "step_median_ms": step_median,
        "refresh_mean_ms": refresh_mean,
        "refresh_calls": [c["call"] for c in refresh],
        "amortised_step_ms": amortised,
        "fwd_bwd_median_ms": fwd_bwd_median,
        "amortised_full_ms": None if amortised is None else amortised + fwd_bwd_median,
        "step_cpu_median_ms": statistics.median(c["step_cpu_ms"] for c in regular),
        "state_bytes": tensor_bytes(list(contender.optimizer.state.values())),
        "step_peak_bytes": max((c["step_peak_bytes"] or 0) for c in measured) or None,
        "final_loss": measured[-1]["loss"],
        "refresh_rule": contender.refresh_rule,
    }


def add_ratios(summary: list[dict[str, Any]], baseline: str) -> None:
    """Add amortised step, amortised full and state ratios to the ``baseline`` row."""
    base = next(row for row in summary if row["optimizer"] == baseline)
    keys = {"step": "amortised_step_ms", "full": "amortised_full_ms", "state": "state_bytes",
            "peak": "step_peak_bytes"}
    for row in summary:
        for label, key in keys.items():
            valid = row[key] is not None and base[key]
            row[f"{label}_ratio"] = row[key] / base[key] if valid else None


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    """Fixed-point number, or an en dash for a missing value."""
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_ms(value: float | None) -> str:
    """Milliseconds: two decimals below 10 ms, one above."""
    return fmt(value, 2 if value is not None and value < 10 else 1)


def markdown_table(summary: list[dict[str, Any]], baseline: str) -> str:
    """The summary as a Markdown table; times in ms (wall clock unless marked CPU)."""
    header = ["optimizer", "step median", "refresh mean (calls)", "amortised step",
              "fwd+bwd median", "amortised full", "step CPU median", "state bytes",
              "final loss", f"step × {baseline}", f"full × {baseline}", f"state × {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    peak = any(row["step_peak_bytes"] for row in summary)
    if peak:
        header[8:8] = ["step peak bytes", f"peak × {baseline}"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        calls = ", ".join(map(str, row["refresh_calls"]))
        refresh = fmt_ms(row["refresh_mean_ms"]) + (f" ({calls})" if calls else "")
        cells = [row["optimizer"], fmt_ms(row["step_median_ms"]), refresh,
                 fmt_ms(row["amortised_step_ms"]), fmt_ms(row["fwd_bwd_median_ms"]),
                 fmt_ms(row["amortised_full_ms"]), fmt_ms(row["step_cpu_median_ms"]),
                 f"{row['state_bytes']:,}", fmt(row["final_loss"], 4),
                 fmt(row["step_ratio"], 2), fmt(row["full_ratio"], 2), fmt(row["state_ratio"], 2)]
        if peak:
            cells[8:8] = [f"{row['step_peak_bytes'] or 0:,}", fmt(row["peak_ratio"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options; ``--quick`` fills the options the user did not give."""
    parser = argparse.ArgumentParser(
        description="Interleaved step-time benchmark of mlfop.SOAP against AdamW, "
                    "pytorch_optimizer.SOAP and heavyball.SOAP on a small GPT (CPU).")
    parser.add_argument("--optimizers", nargs="+", type=contender_name, default=list(DEFAULT_CONTENDERS),
                        help=f"contenders to run, from {CONTENDERS}; ML-FOP-SOAP ones may add "
                             "+heads, +noshrink, +sharedstats, +diag=off|global|block|head (default: all but "
                             "mlfop_fop_k3; heavyball is skipped if missing)")
    parser.add_argument("--baseline", type=contender_name, default="mlfop_soap",
                        help="contender the ratio columns divide by (default: mlfop_soap)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="an accumulated-batch setting: " + "; ".join(
                            f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                            for name, values in PRESETS.items()))
    parser.add_argument("--model", choices=sorted(MODELS), help="decoder (default gpt)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameter dtype (the optimizers' statistics stay float32)")
    parser.add_argument("--d-model", type=int, help="model width (default 256)")
    parser.add_argument("--layers", type=int, help="transformer blocks (default 4)")
    parser.add_argument("--heads", type=int, help="attention heads (default 4)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 1024)")
    parser.add_argument("--seq", type=int, help="sequence length (default 64)")
    parser.add_argument("--batch", type=int, help="global batch size (default 32)")
    parser.add_argument("--micro-batches", type=int,
                        help="micro-batches accumulated per step, must divide --batch (default 4)")
    parser.add_argument("--warmup", type=int,
                        help="warm-up calls left out of the summary, must include a refresh (default 12)")
    parser.add_argument("--steps", type=int,
                        help="measured calls after warm-up, at least f (default 20)")
    parser.add_argument("--precondition-frequency", type=int,
                        help="f of every SOAP: refresh the basis every f steps (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of model init and data")
    parser.add_argument("--heavyball-compile", action="store_true",
                        help="keep heavyball's per-op torch.compile (minutes of compiling on CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model for smoke tests: d 64, 2 layers, vocab 128, seq 16, "
                             "batch 8 in 2 micro-batches, warmup 12, steps 4, precondition frequency 4")
    parser.add_argument("--json", type=Path, help="write raw per-call timings and the summary here")
    args = parser.parse_args(argv)

    defaults = {"model": "gpt", "d_model": 256, "layers": 4, "heads": 4, "vocab": 1024, "seq": 64, "batch": 32,
                "micro_batches": 4, "warmup": 12, "steps": 20, "precondition_frequency": 10}
    for source in (PRESETS.get(args.preset, {}), QUICK if args.quick else {}, defaults):
        for key, value in source.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.device = torch.device(args.device)

    f = args.precondition_frequency
    if f < 2:
        parser.error("--precondition-frequency must be at least 2 (some calls must not refresh)")
    if args.warmup < f + 1:
        parser.error(f"--warmup {args.warmup} must be at least f + 1 = {f + 1} (one refresh)")
    if args.steps < f:
        parser.error(f"--steps {args.steps} must be at least f = {f} (a refresh in the window)")
    if args.d_model % args.heads:
        parser.error("--d-model must be divisible by --heads")
    if args.micro_batches < 1 or args.batch % args.micro_batches:
        parser.error(f"--micro-batches {args.micro_batches} must be >= 1 and divide --batch {args.batch}")
    args.optimizers = list(dict.fromkeys(args.optimizers))
    return args


def command_line(argv: Sequence[str] | None) -> str:
    """The command that reproduces this run."""
    args = sys.argv[1:] if argv is None else list(argv)
    script = Path(__file__)
    try:
        script = script.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass  # run from elsewhere: keep the absolute path
    return shlex.join(["python", str(script), *args])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report and return ``{"header", "notes", "summary"}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()

    torch.manual_seed(args.seed)
    base = MODELS[args.model](args.vocab, args.seq, args.d_model, args.layers, args.heads)
    base = base.to(device=args.device, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: {args.model}, {n_params:,} {args.dtype} parameters on {args.device} (d={args.d_model}, layers={args.layers}, "
          f"heads={args.heads}, vocab={args.vocab}, seq={args.seq}, batch={args.batch} "
          f"in {args.micro_batches} micro-batches)",
          flush=True)

    contenders, notes = build_contenders(base, args)
    if "heavyball" in [c.name for c in contenders]:
        compile_state = "on" if args.heavyball_compile else "off (pass --heavyball-compile to keep it)"
        notes.append(f"heavyball: torch.compile {compile_state}")
    names = [c.name for c in contenders]
    baseline = args.baseline if args.baseline in names else names[0]
    if baseline != args.baseline:
        notes.append(f"baseline {args.baseline} not run: ratios are to {baseline}")
    print(f"running {', '.join(names)}: {args.warmup} warm-up + {args.steps} measured calls, "
          "interleaved", flush=True)

    run_interleaved(contenders, make_batches(args, args.warmup + args.steps), args.micro_batches)
    summary = [summarise(c, args.warmup) for c in contenders]
    add_ratios(summary, baseline)

    for contender in contenders:
        if contender.name.endswith("+compile") or "+compile+" in contender.name:
            first = contender.calls[: args.precondition_frequency + 2]  # both branches compiled
            notes.append(f"{contender.name}: its first {len(first)} calls (compiling) took "
                         f"{sum(c['step_ms'] for c in first) / 1e3:.1f} s")
    rules = sorted({f"{c.name}: {c.refresh_rule}" for c in contenders if c.frequency})
    notes += [f"measured calls {args.warmup + 1}..{args.warmup + args.steps}; f = "
              f"{args.precondition_frequency}; {'; '.join(rules)}",
              "times in ms, wall clock except the CPU column (process_time, all threads); "
              "amortised step = (1-1/f)·median + (1/f)·refresh mean; "
              "amortised full = amortised step + fwd+bwd median"]
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    header = (f"torch {torch.__version__} | {device} | threads {args.threads} | OMP_WAIT_POLICY "
              f"{os.environ.get('OMP_WAIT_POLICY')} | load average before "
              f"{load_before}, after {load_average()} | {n_params:,} params | "
              f"command: `{command_line(argv)}`")
    print("\n" + header + "\n")
    print(markdown_table(summary, baseline) + "\n")
    print("\n".join(f"* {note}" for note in notes))

    result = {"header": header, "notes": notes, "summary": summary}
    if args.json:
        raw = {"config": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
               "calls": {c.name: c.calls for c in contenders}}
        args.json.write_text(json.dumps({**result, **raw}, indent=2))
    return result


if __name__ == "__main__":
    main()
