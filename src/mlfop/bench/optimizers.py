"""The contenders, each as an optimizer plus the way it turns micro-batch gradients into a step.

- ``adamw``: ``torch.optim.AdamW`` on the accumulated gradient;
- ``soap``: :class:`mlfop.SOAP` on the accumulated gradient;
- ``mlfop``: :class:`mlfop.MLFOPSOAP`, with ``fold(stream, ...)`` after every micro-batch's
  backward (``p.grad`` keeps the total, as the fold contract says). The fold's counts are chosen
  so that each stream's share ``a_k`` equals its weight ``c_k`` in the loop's objective (see
  :mod:`mlfop.bench.objective`): loss tokens under ``loss_weighting = "token"``, micro-batch counts
  (no ``tokens``) under ``"task"``. Then ML-FOP-SOAP's stream gradient ``S_k / a_k`` is exactly
  ``grad L_k``. ``fold_tokens`` passes token counts under ``"task"`` too, which scales each
  stream's gradient by ``c_k / a_k`` (8.5x for the answer stream on km64): an ablation;
- ``upgrad``: torchjd's UPGrad aggregation of the per-stream gradients, then AdamW. The stream
  gradients are kept apart during accumulation (K gradient-sized buffers, its true memory cost)
  and aggregated before clipping and the step (its true compute cost, timed with the step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchjd.aggregation import UPGrad

import mlfop
from mlfop.bench.config import RunConfig

__all__ = ["GradientRoute", "Folding", "UPGradRoute", "build_optimizer"]


class GradientRoute:
    """Plain accumulation: every backward adds to ``p.grad`` and nothing else happens."""

    def after_backward(self, stream: str, tokens: int) -> None:
        """Called after each micro-batch's backward."""

    def finish(self) -> None:
        """Called once all micro-batches of the step are in, before clipping and the step."""

    def diagnostics(self) -> dict[str, float]:
        """Per-step numbers worth logging (called after the optimizer step)."""
        return {}


class Folding(GradientRoute):
    """ML-FOP-SOAP: fold each micro-batch into its stream; log the optimizer's own diagnostics
    (stream weights and norms, conflict fraction, global betas), flattened to scalars.

    ``count_tokens``: give ``fold`` the micro-batch's loss tokens (the objective weights streams by
    tokens) or nothing (it weights them by micro-batches)."""

    def __init__(self, optimizer: mlfop.MLFOPSOAP, count_tokens: bool) -> None:
        self.optimizer = optimizer
        self.count_tokens = count_tokens

    def after_backward(self, stream: str, tokens: int) -> None:
        self.optimizer.fold(stream, tokens=tokens if self.count_tokens else None)

    def diagnostics(self) -> dict[str, float]:
        return _scalars(self.optimizer.diagnostics())


class UPGradRoute(GradientRoute):
    """Per-stream gradient buffers, aggregated by torchjd's ``UPGrad`` into ``p.grad``.

    The preference vector is all ones, so without conflict the result is the plain sum of the
    stream gradients (the accumulated gradient the other contenders step with)."""

    def __init__(self, params: list[nn.Parameter], streams: tuple[str, ...]) -> None:
        self.params, self.streams = params, streams
        self.aggregator = UPGrad(pref_vector=torch.ones(len(streams)))
        self.buffers: dict[str, list[Tensor]] = {}
        self.last: dict[str, float] = {}

    def after_backward(self, stream: str, tokens: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if stream in self.buffers:
            torch._foreach_add_(self.buffers[stream], grads)
        else:
            self.buffers[stream] = [g.clone() for g in grads]
        for p in self.params:
            p.grad = None

    def finish(self) -> None:
        present = [k for k in self.streams if k in self.buffers]
        jacobian = torch.stack([torch.cat([g.flatten() for g in self.buffers[k]]) for k in present])
        combined = self.aggregator(jacobian)
        norms = jacobian.norm(dim=1)
        self.last = {f"grad_norm_{k}": float(n) for k, n in zip(present, norms)}
        self.last["combined_norm"] = float(combined.norm())
        offset = 0
        for p in self.params:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.buffers = {}

    def diagnostics(self) -> dict[str, float]:
        return dict(self.last)


def _scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict, keyed by their joined path (``weights.gen`` -> ``weights_gen``)."""
    values: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            values.update(_scalars(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"{prefix}{key}"] = float(value)
    return values


def build_optimizer(name: str, model: nn.Module, lr: float, config: RunConfig
                    ) -> tuple[torch.optim.Optimizer, GradientRoute]:
    """The optimizer ``name`` (one of :data:`mlfop.bench.config.OPTIMIZERS`) for the trainable
    parameters of ``model`` (a :class:`~mlfop.bench.models.TinyModel`) and its gradient route.

    All contenders share ``betas``, ``weight_decay`` (on every parameter) and ``eps = 1e-8``.
    ML-FOP-SOAP's head level gets the attention head layouts detected from the model.
    """
    params = model.trainable_parameters()
    common = dict(lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=1e-8)
    if name == "adamw":
        return torch.optim.AdamW(params, **common), GradientRoute()
    if name == "soap":
        return mlfop.SOAP(params, **common), GradientRoute()
    if name == "mlfop":
        heads = model.hf if "head" in config.levels else None
        optimizer = mlfop.MLFOPSOAP(params, streams=config.streams, stream_weights=config.stream_weights,
                                    levels=config.levels, heads=heads, **common)
        return optimizer, Folding(optimizer, count_tokens=config.fold_tokens or config.loss_weighting == "token")
    if name == "upgrad":
        return torch.optim.AdamW(params, **common), UPGradRoute(params, config.streams)
    raise ValueError(f"unknown optimizer {name!r}")
