r"""Where an understanding plateau sits: replay the first steps of finished study runs and watch
what the model knows about the digit, and how large each step is, as training leaves (or does
not leave) the answer prior.

For each run folder (``config.json`` and ``tokenizer.npz`` of an ``mlfop-bench run``, one
optimizer, rate and seed) the script rebuilds the run exactly (same initialisation, data order,
schedule; the replayed train losses equal the folder's own) and, every ``--every`` steps, on the
360 held-out images:

- ``class_info``: how much of the state at the position that predicts the answer is explained
  by the digit, after each trunk layer (``L1`` .. ``L4``), and of the
  image positions' input embeddings (``image``: Janus' aligned vision features, Emu3's code
  embeddings), as the between-class share of variance

  .. math:: \eta^2(X) = \frac{\sum_j \mathrm{Var}_c(\mathbb{E}[X_j \mid c])}{\sum_j \mathrm{Var}(X_j)}

  (0: the state ignores the digit; 1: it is a function of the digit alone), and beside it
  ``spread``, the state's variance over images relative to its mean square,
  :math:`\sum_j \mathrm{Var}(X_j) / \mathbb{E}\lVert X \rVert^2` (near 0: the state hardly
  depends on the image at all, and :math:`\eta^2` measures rounding);
- ``step``: the mean relative spectral size of the last update,
  :math:`\lVert \Delta W \rVert_2 / \lVert W \rVert_2`, over the hidden matrices of each part
  of the model (vision tower, aligners, trunk attention, trunk MLP).

    OMP_NUM_THREADS=1 python benchmarks/und_plateau.py study/janus-b1024/mlfop/lr0.1-s0 \
        study/janus-b1024/muon/lr0.05-adamw0.003-s0 --steps 50 --every 5 --output plateau.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mlfop.bench.config import saved_config
from mlfop.bench.data import DigitsData, load_split
from mlfop.bench.loop import start, train_step
from mlfop.bench.models import TinyModel
from mlfop.bench.objective import make_plan
from mlfop.bench.runfolder import RunFolder
from mlfop.bench.runner import run_specs
from mlfop.bench.tokenizers import load_tokenizer
from mlfop.bench.vocab import und_image_positions

# Parts of the model by parameter-name fragment, first match wins; hidden matrices only.
PARTS = (("vision", "vision_model"), ("aligner", "aligner"), ("attention", "self_attn"), ("mlp", ".mlp."))


def class_info(states: Tensor, labels: Tensor) -> float:
    r""":math:`\eta^2`: the between-class share of the total variance of ``states`` ``(n, d)``."""
    centred = states - states.mean(0)
    means = torch.stack([centred[labels == c].mean(0) for c in labels.unique()])
    weights = torch.bincount(labels)[labels.unique()].to(states.dtype) / len(labels)
    between = (weights[:, None] * means.square()).sum()
    return float(between / centred.square().mean(0).sum().clamp_min(1e-30))


def spread(states: Tensor) -> float:
    """The variance of ``states`` ``(n, d)`` over its rows relative to their mean square."""
    return float(states.var(0, unbiased=False).sum() / states.square().sum(1).mean().clamp_min(1e-30))


@torch.no_grad()
def probe(model: TinyModel, data: DigitsData) -> dict[str, float]:
    """``class_info`` and ``spread`` of the image inputs and of the answer-predicting state after
    each layer."""
    test = data.test
    hidden = model.und_hidden_states(test)
    states = {"image": hidden[0][:, und_image_positions(hidden[0].shape[1])].flatten(1)}
    for layer, state in enumerate(hidden[1:], start=1):  # at the position that predicts the answer
        states[f"L{layer}"] = state[:, -1]
    return {**{name: class_info(x, test.labels) for name, x in states.items()},
            **{f"spread_{name}": spread(x) for name, x in states.items()}}


def part_of(name: str) -> str | None:
    return next((part for part, fragment in PARTS if fragment in name), None)


def replay(folder: Path, steps: int, every: int) -> list[dict]:
    """Rebuild the run of ``folder`` and record :func:`probe` and the relative step sizes."""
    config = saved_config(RunFolder(folder).read_json("config.json"))
    torch.set_num_threads(config.threads)
    train_split, test_split = load_split()
    tokenizer = load_tokenizer(folder / "tokenizer.npz")
    data = DigitsData(train_split, test_split, tokenizer, config.augment)
    plan = make_plan(config, tokenizer.tokens)
    (spec,) = run_specs(config)
    model, contender, schedulers = start(spec, config, data, plan)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = [(part_of(names[id(p)]), p) for p in model.hidden_matrices()]
    hidden = [(part, p) for part, p in hidden if part is not None]
    records = [{"run": str(folder), "step": 0, **probe(model, data)}]
    for step in range(steps):
        before = [p.detach().clone() for _, p in hidden]
        losses, _ = train_step(model, data, plan, contender, spec.seed, step, config.clip, None)
        for scheduler in schedulers:
            scheduler.step()
        if (step + 1) % every:
            continue
        sizes: dict[str, list[float]] = {}
        for (part, p), old in zip(hidden, before):
            ratio = torch.linalg.matrix_norm(p.detach() - old, ord=2) / torch.linalg.matrix_norm(old, ord=2)
            sizes.setdefault(part, []).append(float(ratio))
        steps_by_part = {f"step_{part}": sum(v) / len(v) for part, v in sizes.items()}
        records.append({"run": str(folder), "step": step + 1, **losses, **steps_by_part, **probe(model, data)})
        print(json.dumps(records[-1]), flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished run folders (one run each)")
    parser.add_argument("--steps", type=int, default=50, help="steps to replay")
    parser.add_argument("--every", type=int, default=5, help="steps between records")
    parser.add_argument("--output", type=Path, required=True, help="JSON lines, one record per run and step")
    args = parser.parse_args(argv)
    records = [record for folder in args.folders for record in replay(folder, args.steps, args.every)]
    args.output.write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
