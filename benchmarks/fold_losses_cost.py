"""What splitting a mixed micro-batch by stream costs: ``fold_losses`` against the sampler route.

Every route trains its own copy of the same small Llama (``transformers``) with ML-FOP-SOAP on
the same examples, ``--accumulation`` micro-batches of ``--micro-batch`` sequences per optimizer
step, each example tagged with one of K streams (``--streams``, in proportions 3:2:1...):

* ``sampler``: the examples regrouped into single-stream micro-batches
  (:class:`mlfop.StreamBatchSampler`): per micro-batch one forward, one backward, one fold;
* ``fold_losses``: the micro-batches as they come, mixed: one forward, then
  :func:`mlfop.fold_losses` with the loss split by stream (K backward passes);
* ``one_backward``: the mixed micro-batches with a single backward and no split (what the
  data path costs without streams; its step is then single-stream, so only its accumulation
  time is reported).

The routes run interleaved step by step in one process, in an order rotated every round, so
that noise from a shared machine hits them alike. Per route the median over the measured steps
of the accumulation (forwards, backwards, folds) and of ``opt.step()`` are printed, with the
ratios to the sampler route and, for the accumulation, to ``one_backward``. Output: a Markdown
table. Run ``python benchmarks/fold_losses_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no OpenMP spin-waits on a shared CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import mlfop  # noqa: E402

ROUTES = ("sampler", "fold_losses", "one_backward")
STREAM_NAMES = ("t2i", "i2t", "text", "audio")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 3], help="values of K to measure")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per route")
    parser.add_argument("--warmup", type=int, default=3, help="steps per route before measuring")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.streams) < 2 or max(args.streams) > len(STREAM_NAMES):
        parser.error(f"--streams must be between 2 and {len(STREAM_NAMES)}")
    return args


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq)
    return LlamaForCausalLM(config)


def make_data(args: argparse.Namespace, k: int, steps: int) -> tuple[torch.Tensor, list[str]]:
    """Token ids of ``steps`` optimizer steps and each example's stream (proportions k : k-1 : ... : 1)."""
    count = steps * args.accumulation * args.micro_batch
    generator = torch.Generator().manual_seed(args.seed + k)
    ids = torch.randint(0, args.vocab, (count, args.seq), generator=generator)
    weights = torch.arange(k, 0, -1, dtype=torch.float)
    streams = [STREAM_NAMES[i] for i in torch.multinomial(weights, count, replacement=True, generator=generator)]
    return ids, streams


def token_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss per sequence (summed over its tokens)."""
    logits = model(input_ids=ids).logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return per_token.view(ids.shape[0], -1).sum(1)


class Route:
    """One route's model, optimizer and micro-batches (index lists per optimizer step)."""

    def __init__(self, name: str, base: torch.nn.Module, ids: torch.Tensor, streams: list[str], k: int,
                 args: argparse.Namespace) -> None:
        self.name, self.ids, self.streams, self.args = name, ids, streams, args
        self.model = copy.deepcopy(base)
        self.opt = mlfop.MLFOPSOAP(self.model.parameters(), streams=STREAM_NAMES[:k], lr=3e-3)
        accumulation, size = args.accumulation, args.micro_batch
        if name == "sampler":
            sampler = mlfop.StreamBatchSampler(streams, size, accumulation_steps=accumulation, seed=args.seed,
                                               drop_last=True)
            batches = list(sampler)
        else:
            batches = [list(range(i, i + size)) for i in range(0, len(streams), size)]
        self.steps = [batches[i : i + accumulation] for i in range(0, len(batches) - accumulation + 1, accumulation)]
        self.accumulate_s: list[float] = []
        self.step_s: list[float] = []

    def run(self, step: int, measure: bool) -> None:
        micro_batches = self.steps[step]
        tokens_per_sequence = self.args.seq - 1
        step_tokens = tokens_per_sequence * sum(map(len, micro_batches))
        start = time.perf_counter()
        for indices in micro_batches:
            per_sequence = token_losses(self.model, self.ids[indices]) / step_tokens
            tags = [self.streams[i] for i in indices]
            if self.name == "sampler":
                per_sequence.sum().backward()
                self.opt.fold(tags[0], tokens=tokens_per_sequence * len(indices))
            elif self.name == "fold_losses":
                rows = {name: torch.tensor([t == name for t in tags]) for name in dict.fromkeys(tags)}
                mlfop.fold_losses(self.opt, {name: per_sequence[r].sum() for name, r in rows.items()},
                                  {name: tokens_per_sequence * int(r.sum()) for name, r in rows.items()})
            else:
                per_sequence.sum().backward()
        middle = time.perf_counter()
        if self.name != "one_backward":
            self.opt.step()
        self.opt.zero_grad()
        end = time.perf_counter()
        if measure:
            self.accumulate_s.append(middle - start)
            self.step_s.append(end - middle)


def measure(args: argparse.Namespace, k: int) -> dict[str, tuple[float, float]]:
    steps = args.warmup + args.steps
    ids, streams = make_data(args, k, steps + 1)  # one step more: the sampler's windows may end short
    base = build_model(args)
    routes = [Route(name, base, ids, streams, k, args) for name in ROUTES]
    for step in range(steps):
        order = routes[step % len(routes):] + routes[: step % len(routes)]
        for route in order:
            route.run(step, measure=step >= args.warmup)
    return {r.name: (statistics.median(r.accumulate_s), statistics.median(r.step_s) if r.step_s else 0.0)
            for r in routes}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(f"command: python benchmarks/fold_losses_cost.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"torch {torch.__version__}, {args.threads} thread(s); Llama hidden {args.hidden}, {args.layers} layers, "
          f"seq {args.seq}; {args.accumulation} micro-batches of {args.micro_batch} per step; medians of "
          f"{args.steps} steps after {args.warmup}\n")
    print("| K | route | accumulation ms | step ms | total ms | total / sampler | accumulation / one backward |")
    print("|---|---|---|---|---|---|---|")
    for k in args.streams:
        results = measure(args, k)
        sampler_total = sum(results["sampler"])
        one_backward = results["one_backward"][0]
        for name in ROUTES:
            accumulate, step = results[name]
            total = "" if name == "one_backward" else f"{1e3 * (accumulate + step):.1f}"
            ratio = "" if name == "one_backward" else f"{(accumulate + step) / sampler_total:.2f}"
            print(f"| {k} | {name} | {1e3 * accumulate:.1f} | {1e3 * step:.1f} | {total} | {ratio} | "
                  f"{accumulate / one_backward:.2f} |")


if __name__ == "__main__":
    main()
