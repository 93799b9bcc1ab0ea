"""The contenders, each as an optimizer plus the way it turns micro-batch gradients into a step.

- ``adamw``: ``torch.optim.AdamW`` on the accumulated gradient;
- ``soap``: :class:`mlfop.SOAP` on the accumulated gradient;
- ``mlfop``: :class:`mlfop.MLFOPSOAP`, with ``fold(stream, tokens=...)`` after every
  micro-batch's backward (``p.grad`` keeps the total, as the fold contract says);
- ``upgrad``: torchjd's UPGrad aggregation of the per-stream gradients, then AdamW. The stream
  gradients are kept apart during accumulation (K gradient-sized buffers, its true memory cost)
  and aggregated before clipping and the step (its true compute cost, timed with the step).
"""

from __future__ import annotations

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
        """Per-step numbers worth logging (called after :meth:`finish`)."""
        return {}


class Folding(GradientRoute):
    """ML-FOP-SOAP: fold each micro-batch into its stream; log the stream weights and norms."""

    def __init__(self, optimizer: mlfop.MLFOPSOAP) -> None:
        self.optimizer = optimizer

    def after_backward(self, stream: str, tokens: int) -> None:
        self.optimizer.fold(stream, tokens=tokens)

    def diagnostics(self) -> dict[str, float]:
        values = {f"weight_{k}": w for k, w in self.optimizer.current_stream_weights().items()}
        for stream, grads in self.optimizer.current_stream_gradients().items():
            values[f"grad_norm_{stream}"] = _norm([g for g in grads if g is not None])
        return values


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


def _norm(tensors: list[Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def build_optimizer(name: str, params: list[nn.Parameter], lr: float, config: RunConfig
                    ) -> tuple[torch.optim.Optimizer, GradientRoute]:
    """The optimizer ``name`` (one of :data:`mlfop.bench.config.OPTIMIZERS`) and its gradient route.

    All contenders share ``betas``, ``weight_decay`` (on every parameter) and ``eps = 1e-8``.
    """
    common = dict(lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=1e-8)
    if name == "adamw":
        return torch.optim.AdamW(params, **common), GradientRoute()
    if name == "soap":
        return mlfop.SOAP(params, **common), GradientRoute()
    if name == "mlfop":
        optimizer = mlfop.MLFOPSOAP(params, streams=config.streams, stream_weights=config.stream_weights,
                                    levels=config.levels, **common)
        return optimizer, Folding(optimizer)
    if name == "upgrad":
        return torch.optim.AdamW(params, **common), UPGradRoute(params, config.streams)
    raise ValueError(f"unknown optimizer {name!r}")
