"""How far ML-FOP-SOAP's combined direction leaves the streams' second-moment envelope.

On the benchmark's default job (tiny Emu3, km64, one global batch of 1024 sequences from
micro-batches of 64), this takes ML-FOP-SOAP's first update (the first call only sets the
eigenbases) with the layer level and with the head level, and prints per level, over the
blocks of each kind:

* ``envelope``: the largest :math:`g_{comb,j}^2 / \\sum_k w_k r_{k,j}^2` over eigen-coordinates
  ``j``, i.e. how much the combined direction exceeds the streams' own second moment, which
  is all that SOAP's denominator would normalise (1 or less means inside the envelope);
* ``update/lr``: the largest coordinate of the first update in the eigenbasis over the
  learning rate (at most 1 when :math:`V` takes :math:`\\max(\\sum_k w_k r_k^2, g_{comb}^2)`,
  as ``MLFOPSOAP`` does).

``python benchmarks/first_step_envelope.py`` (about 20 s on one thread). The combined direction
is read from the optimizer's state: after the first update the eigenbasis momentum is
:math:`(1-\\beta_1) g_{comb}`.
"""

from __future__ import annotations

import argparse

import torch

import mlfop
from mlfop.bench.config import RunConfig
from mlfop.bench.data import DigitsData, load_split
from mlfop.bench.models import build_model
from mlfop.bench.objective import make_plan, stream_nll
from mlfop.bench.tokenizers import make_tokenizer
from mlfop.functional.rotation import rotate


def first_update(levels: tuple[str, ...], config: RunConfig, data: DigitsData, lr: float) -> dict[str, list[float]]:
    """Per block kind (``head`` for blocks with a head layout, else ``layer``): envelope and update/lr."""
    torch.manual_seed(0)
    model = build_model(config.model, config.model_config, data.tokenizer.codes, data.tokenizer.tokens)
    params = model.trainable_parameters()
    beta1 = config.betas[0]
    opt = mlfop.MLFOPSOAP(params, lr=lr, betas=tuple(config.betas), weight_decay=0.0, streams=config.streams,
                          levels=levels, heads=model.hf if "head" in levels else None)
    plan = make_plan(config, data.tokenizer.tokens)
    found: dict[str, list[float]] = {}
    for step in range(2):
        for stream, index in plan.micro:
            nll = stream_nll(model, stream, data.micro_batch(0, step, stream, index, plan.size))
            (plan.scales[stream] * nll).backward()
            opt.fold(stream)
        if step == 1:
            streams = opt.current_stream_gradients()
            before = {index: (p.detach().clone(), [opt.state[p][f"basis_{i}"].clone() for i in range(p.dim())])
                      for index, p in enumerate(params) if p.dim() == 2 and opt.state[p]["exp_avg"].shape == p.shape}
        opt.step()
        opt.zero_grad()
    weights = opt.diagnostics()["weights"]
    heads = mlfop.detect_head_layouts(model.hf) if "head" in levels else {}
    for index, (theta, bases) in before.items():
        p = params[index]
        rotated = rotate(torch.stack([streams[name][index] for name in config.streams]), bases)
        envelope = torch.tensordot(torch.tensor([weights[s] for s in config.streams]), rotated.square(), dims=1)
        combined = opt.state[p]["exp_avg"] / (1.0 - beta1)
        moved = rotate((p.detach() - theta)[None], bases)[0]
        kind = "head" if p in heads else "layer"
        found.setdefault(f"{kind} envelope", []).append(float((combined.square() / envelope.clamp_min(1e-30)).max()))
        found.setdefault(f"{kind} update/lr", []).append(float(moved.abs().max()) / lr)
    return found


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Print the table; return the measurements per levels setting (for the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1024, help="global batch (default 1024, the default job's)")
    parser.add_argument("--micro-batch", type=int, default=64, help="micro-batch (default 64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = RunConfig(batch=args.batch, micro_batch=args.micro_batch).validate()
    train_split, test_split = load_split()
    tokenizer = make_tokenizer(config.tokenizer, train_split.images)
    data = DigitsData(train_split, test_split, tokenizer, config.augment)
    print("| levels | blocks | n | largest envelope ratio | median | largest update/lr |")
    print("|---|---|---|---|---|---|")
    measured = {}
    for levels in (("global", "layer"), ("global", "layer", "head")):
        found = measured["+".join(levels)] = first_update(levels, config, data, args.lr)
        for kind in ("layer", "head"):
            if f"{kind} envelope" not in found:
                continue
            ratios = sorted(found[f"{kind} envelope"])
            print(f"| {'+'.join(levels)} | {kind} | {len(ratios)} | {ratios[-1]:.3g} | "
                  f"{ratios[len(ratios) // 2]:.3g} | {max(found[f'{kind} update/lr']):.4f} |")
    return measured


if __name__ == "__main__":
    main()
