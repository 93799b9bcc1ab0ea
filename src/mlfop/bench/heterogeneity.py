"""Per-layer heterogeneity of the generation and understanding gradients, for any optimizer.

On a probed step, :class:`StreamProbe` reads each micro-batch's gradient off ``p.grad`` (the
running total after its backward, minus the total before it) and sums it into its stream, so
it costs a copy of the gradient per micro-batch and no extra backward. From the two streams'
gradients ``g = grad L_gen`` and ``u = grad L_und`` it reports, over all parameters and per
layer (:func:`layer_of`):

- ``cos``: the cosine of ``g`` and ``u`` (the Euclidean one ML-FOP-SOAP's block diagnostics
  call ``cos``);
- ``norm_ratio``: ``|g| / |u|``;
- ``conflict``: the fraction of parameter tensors whose two gradients have a negative inner
  product (ML-FOP-SOAP's ``conflict_fraction`` counts blocks the same way).

Tensors that one stream does not reach (Janus' vision encoder, its generation head) count in
neither, and a layer that one stream does not reach has no values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["StreamProbe", "layer_of", "PAIR"]

PAIR = ("gen", "und")  # the two streams compared


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name up to the first layer index
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else its module."""
    parts = name.removeprefix("hf.").split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 2)
    return ".".join(parts[: index + 1])


class StreamProbe:
    """Collects one step's per-stream gradients of ``named_params`` and summarises them.

    ``shares``: the objective's weight ``c_k`` of each stream, so that stream sums of the scaled
    micro-batch losses become ``grad L_k``."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], shares: dict[str, float]) -> None:
        self.params = [p for _, p in named_params]
        self.layers = [layer_of(name) for name, _ in named_params]
        self.shares = shares
        self.sums: dict[str, list[Tensor]] = {}
        self.before: list[Tensor] = []

    def start(self) -> None:
        """Begin a probed step (``p.grad`` is empty)."""
        self.sums = {}
        self.before = [torch.zeros_like(p) for p in self.params]

    def collect(self, stream: str) -> None:
        """After a micro-batch's backward, before the gradient route sees it."""
        micro = [(p.grad if p.grad is not None else torch.zeros_like(p)) - b for p, b in zip(self.params, self.before)]
        if stream in self.sums:
            torch._foreach_add_(self.sums[stream], micro)
        else:
            self.sums[stream] = micro

    def rebase(self) -> None:
        """After the gradient route handled the micro-batch (it may have moved ``p.grad``)."""
        self.before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def summary(self) -> dict[str, object]:
        """``cos``, ``norm_ratio`` and ``conflict`` over all parameters and per layer."""
        gen, und = ([g / self.shares[k] for g in self.sums[k]] for k in PAIR)
        dots = [float((g * u).sum()) for g, u in zip(gen, und)]
        gen_sq = [float(g.square().sum()) for g in gen]
        und_sq = [float(u.square().sum()) for u in und]
        reached = [a > 0 and b > 0 for a, b in zip(gen_sq, und_sq)]

        def stats(indices: list[int]) -> dict[str, float | None]:
            both = [i for i in indices if reached[i]]
            if not both:
                return {"cos": None, "norm_ratio": None, "conflict": None}
            g2, u2 = sum(gen_sq[i] for i in both), sum(und_sq[i] for i in both)
            return {"cos": sum(dots[i] for i in both) / math.sqrt(g2 * u2), "norm_ratio": math.sqrt(g2 / u2),
                    "conflict": sum(dots[i] < 0 for i in both) / len(both)}

        layers = {layer: stats([i for i, name in enumerate(self.layers) if name == layer])
                  for layer in dict.fromkeys(self.layers)}
        return {**stats(list(range(len(self.params)))), "layers": layers}
