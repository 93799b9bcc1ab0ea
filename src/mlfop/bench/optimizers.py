"""The contenders, each as one or two optimizers plus the way micro-batch gradients become a step.

- ``adamw``: ``torch.optim.AdamW`` on the accumulated gradient;
- ``soap``: :class:`mlfop.SOAP` on the accumulated gradient;
- ``mlfop``: :class:`mlfop.MLFOPSOAP`, with ``fold(stream, ...)`` after every micro-batch's
  backward (``p.grad`` keeps the total, as the fold contract says). The fold's counts are chosen
  so that each stream's share ``a_k`` equals its weight ``c_k`` in the loop's objective (see
  :mod:`mlfop.bench.objective`): loss tokens under ``loss_weighting = "token"``, micro-batch counts
  (no ``tokens``) under ``"task"``. Then ML-FOP-SOAP's stream gradient ``S_k / a_k`` is exactly
  ``grad L_k``. ``fold_tokens`` passes token counts under ``"task"`` too, which scales each
  stream's gradient by ``c_k / a_k`` (8.5x for the answer stream on km64): an ablation;
- ``muon``: ``torch.optim.Muon`` on the hidden matrices (:meth:`~mlfop.bench.models.TinyModel.
  hidden_matrices`) and ``torch.optim.AdamW`` at its own rate on the rest (embeddings, output
  heads, 1-D and convolution parameters), both on the accumulated gradient;
- ``fop-muon``: the same two optimizers, with the Fisher-orthogonal combination of the stream
  gradients (:class:`FOPMuonRoute`) in front of Muon: a benchmark variant, not in the library;
- ``upgrad``: torchjd's UPGrad aggregation of the per-stream gradients, then AdamW;
- ``famo``: torchjd's FAMO loss weighting of the per-stream losses, then AdamW.

``upgrad`` and ``famo`` keep the stream gradients apart during accumulation (K gradient-sized
buffers, their true memory cost) and combine them before clipping and the step (their true
compute cost, timed with the step; FAMO's also includes the forward pass over the step's batch
that re-measures the losses after the update).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchjd.aggregation import UPGrad
from torchjd.scalarization import FAMO

import mlfop
from mlfop.bench.config import MUON_BASED, RunConfig
from mlfop.functional import combine_block, fop_system, stream_grams
from mlfop.optim.config import FOPConfig

__all__ = ["GradientRoute", "Folding", "StreamBuffers", "UPGradRoute", "FAMORoute", "FOPMuonRoute", "Contender",
           "build_contender"]


class GradientRoute:
    """Plain accumulation: every backward adds to ``p.grad`` and nothing else happens."""

    def after_backward(self, stream: str, tokens: int) -> None:
        """Called after each micro-batch's backward."""

    def finish(self, losses: dict[str, float]) -> None:
        """Called once all micro-batches of the step are in (``losses``: each stream's mean NLL
        per loss token over the step), before clipping and the step."""

    def after_step(self, remeasure: Callable[[], dict[str, float]]) -> None:
        """Called after the optimizer step; ``remeasure()`` gives the step's ``losses`` again, at
        the updated parameters."""

    def diagnostics(self) -> dict[str, float]:
        """Per-step numbers worth logging (called after the optimizer step)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume the route exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


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


class StreamBuffers(GradientRoute):
    """Per-stream gradient buffers during accumulation; :meth:`combine` writes ``p.grad``.

    Buffer ``k`` holds the gradient of the stream's part of the objective, ``c_k grad L_k``."""

    def __init__(self, params: list[nn.Parameter], streams: tuple[str, ...]) -> None:
        self.params, self.streams = params, streams
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

    def finish(self, losses: dict[str, float]) -> None:
        jacobian = torch.stack([torch.cat([g.flatten() for g in self.buffers[k]]) for k in self.streams])
        combined = self.combine(jacobian, losses)
        self.last = {f"grad_norm_{k}": float(n) for k, n in zip(self.streams, jacobian.norm(dim=1))}
        self.last["combined_norm"] = float(combined.norm())
        offset = 0
        for p in self.params:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.buffers = {}

    def combine(self, jacobian: Tensor, losses: dict[str, float]) -> Tensor:
        """The update direction from the stacked stream buffers (one row per stream)."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        return dict(self.last)


class UPGradRoute(StreamBuffers):
    """torchjd's ``UPGrad`` of the stream buffers. The preference vector is all ones, so without
    conflict the result is their plain sum (the accumulated gradient the others step with)."""

    def __init__(self, params: list[nn.Parameter], streams: tuple[str, ...]) -> None:
        super().__init__(params, streams)
        self.aggregator = UPGrad(pref_vector=torch.ones(len(streams)))

    def combine(self, jacobian: Tensor, losses: dict[str, float]) -> Tensor:
        return self.aggregator(jacobian)


class FAMORoute(StreamBuffers):
    """torchjd's ``FAMO`` (Liu et al., NeurIPS 2023): the step follows the gradient of FAMO's
    scalarisation of the stream losses, ``sum_k alpha_k grad L_k`` with ``alpha_k`` its derivative
    in ``L_k``; after the step, FAMO's task logits learn from the losses re-measured on the same
    batch. ``shares``: the objective's ``c_k``, to read ``grad L_k`` off buffer ``k``."""

    def __init__(self, params: list[nn.Parameter], streams: tuple[str, ...], shares: dict[str, float], lr: float,
                 weight_decay: float) -> None:
        super().__init__(params, streams)
        self.shares = torch.tensor([shares[k] for k in streams])
        self.famo = FAMO(len(streams), lr=lr, weight_decay=weight_decay)
        self.weights: dict[str, float] = {}  # FAMO's task weights z_k of the last step

    def combine(self, jacobian: Tensor, losses: dict[str, float]) -> Tensor:
        values = torch.tensor([losses[k] for k in self.streams], requires_grad=True)
        (alpha,) = torch.autograd.grad(self.famo(values), values)
        weights = alpha * values.detach()  # FAMO's task weights z_k, up to their normaliser
        self.weights = dict(zip(self.streams, (weights / weights.sum()).tolist()))
        return (alpha / self.shares) @ jacobian

    def after_step(self, remeasure: Callable[[], dict[str, float]]) -> None:
        losses = remeasure()
        self.famo.update(torch.tensor([losses[k] for k in self.streams]))

    def diagnostics(self) -> dict[str, float]:
        return {**self.last, **{f"famo_weight_{k}": w for k, w in self.weights.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"famo": self.famo}  # pickled whole: its logits and the Adam that learns them

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.famo = state["famo"]


class FOPMuonRoute(StreamBuffers):
    r"""The Fisher-orthogonal combination in front of Muon, with a diagonal Adam-style metric.

    For the hidden matrices (Muon's parameters), stacked by shape, with stream gradients
    :math:`g_k = S_k / c_k` (``S_k`` buffer ``k``) and weights :math:`w_k = c_k`:

    .. math::
        s = \textstyle\sum_k w_k g_k^2, \quad h = \sqrt{\mathrm{lerp}(v, s, 1-\beta_2)} + \epsilon, \quad
        g_{comb} = \mathrm{FOP}_h(g_1, \dots, g_K), \quad
        v \leftarrow \mathrm{lerp}(v, \max(s, g_{comb}^2), 1-\beta_2)

    (:func:`mlfop.functional.combine_block` in the identity basis: the layer level, one
    :math:`\beta` per matrix clipped to ``beta_max``, no noise shrinkage); Muon then steps on
    ``p.grad`` :math:`= g_{comb}`. :math:`\eta^*` is left out: Muon's orthogonalisation fixes the
    step's length, which its rate sets. The other parameters get the plain sum
    :math:`\sum_k S_k` (the accumulated gradient) for AdamW. ``v`` starts at zero; no bias
    correction is needed, as :math:`\beta` and :math:`g_{comb}` do not change when :math:`h`
    is scaled."""

    def __init__(self, params: list[nn.Parameter], hidden: list[nn.Parameter], streams: tuple[str, ...],
                 shares: dict[str, float], beta2: float, eps: float) -> None:
        super().__init__(params, streams)
        self.weights = torch.tensor([shares[k] for k in streams], dtype=torch.float32)
        self.beta2, self.eps, self.fop = beta2, eps, FOPConfig()
        self.beta_mean = 0.0  # mean |beta| over the hidden matrices at the last step
        offsets, start = {}, 0
        for p in params:
            offsets[id(p)] = start
            start += p.numel()
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for p in hidden:
            by_shape.setdefault(tuple(p.shape), []).append(offsets[id(p)])
        self.stacks = [(math.prod(shape), starts) for shape, starts in by_shape.items()]
        self.exp_avg_sq = [torch.zeros(len(starts), size) for size, starts in self.stacks]

    def combine(self, jacobian: Tensor, losses: dict[str, float]) -> Tensor:
        combined = jacobian.sum(0)
        betas = []
        for (size, starts), exp_avg_sq in zip(self.stacks, self.exp_avg_sq):
            index = torch.tensor(starts)[:, None] + torch.arange(size)  # (B, N) positions in the flat gradient
            streams = jacobian[:, index].transpose(0, 1) / self.weights[:, None]  # (B, K, N): grad L_k
            second_moment = (streams.square() * self.weights[:, None]).sum(1)
            metric = exp_avg_sq.lerp(second_moment, 1.0 - self.beta2).sqrt_().add_(self.eps)
            system = fop_system(*stream_grams(streams, metric), self.weights, self.fop.eps_fop)
            combination = combine_block(streams, second_moment, system, beta_max=self.fop.beta_max,
                                        eta_range=self.fop.eta_range)
            exp_avg_sq.lerp_(combination.second_moment, 1.0 - self.beta2)
            combined[index] = combination.momentum
            betas.append(combination.beta.abs().amax(-1))
        self.beta_mean = float(torch.cat(betas).mean()) if betas else 0.0
        return combined

    def diagnostics(self) -> dict[str, float]:
        return {**self.last, "fop_beta_abs_mean": self.beta_mean}

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg_sq": [v.clone() for v in self.exp_avg_sq]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg_sq = [v.clone() for v in state["exp_avg_sq"]]


def _scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict, keyed by their joined path (``weights.gen`` -> ``weights_gen``)."""
    values: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            values.update(_scalars(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"{prefix}{key}"] = float(value)
    return values


@dataclass
class Contender:
    """The optimizers of one run (each with its own schedule) and its gradient route."""

    optimizers: list[torch.optim.Optimizer]
    route: GradientRoute


def build_contender(name: str, model: nn.Module, lr: float, config: RunConfig, shares: dict[str, float],
                    adamw_lr: float | None = None) -> Contender:
    """The contender ``name`` (one of :data:`mlfop.bench.config.OPTIMIZERS`) for the trainable
    parameters of ``model`` (a :class:`~mlfop.bench.models.TinyModel`).

    ``shares``: the objective's weight ``c_k`` of each stream; ``adamw_lr``: the rate of Muon's
    AdamW part. With ``config.outer_lr`` the one-optimizer contenders get Muon's split as two
    parameter groups: the hidden matrices at ``lr``, the rest at ``outer_lr``. The Adam-type
    contenders share ``betas``, ``weight_decay`` (on every parameter) and ``eps = 1e-8``.
    ML-FOP-SOAP's head level gets the attention head layouts detected from the model.
    """
    params = model.trainable_parameters()
    hidden = model.hidden_matrices()
    inner = {id(p) for p in hidden}
    outer = [p for p in params if id(p) not in inner]
    common = dict(lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=1e-8)
    groups = [{"params": hidden}, {"params": outer, "lr": config.outer_lr}] if config.outer_lr else params
    if name == "adamw":
        return Contender([torch.optim.AdamW(groups, **common)], GradientRoute())
    soap_type = dict(common, state_dtype=config.state_dtype)
    if name == "soap":
        return Contender([mlfop.SOAP(groups, **soap_type)], GradientRoute())
    if name == "mlfop":
        heads = model.hf if "head" in config.levels else None
        optimizer = mlfop.MLFOPSOAP(groups, streams=config.streams, stream_weights=config.stream_weights,
                                    levels=config.levels, heads=heads, noise_shrinkage=config.noise_shrinkage,
                                    stream_statistics=config.stream_statistics, beta_max=config.beta_max,
                                    eta_range=tuple(config.eta_range), **soap_type)
        return Contender([optimizer], Folding(optimizer, config.fold_tokens or config.loss_weighting == "token"))
    if name in MUON_BASED:
        muon = torch.optim.Muon(hidden, lr=lr, weight_decay=config.muon_weight_decay, ns_steps=config.muon_ns_steps,
                                adjust_lr_fn=config.muon_adjust_lr)
        rest = torch.optim.AdamW(outer, **{**common, "lr": adamw_lr})
        route = (GradientRoute() if name == "muon" else
                 FOPMuonRoute(params, hidden, config.streams, shares, config.betas[1], common["eps"]))
        return Contender([muon, rest], route)
    if name == "upgrad":
        return Contender([torch.optim.AdamW(groups, **common)], UPGradRoute(params, config.streams))
    if name == "famo":
        route = FAMORoute(params, config.streams, shares, config.famo_lr, config.famo_weight_decay)
        return Contender([torch.optim.AdamW(groups, **common)], route)
    raise ValueError(f"unknown optimizer {name!r}")
