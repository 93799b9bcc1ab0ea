"""The optimizers the contract tests run over (in the spirit of torch's ``OptimizerInfo`` table).

- ``SOAP``: :class:`mlfop.SOAP`;
- ``MLFOPSOAP-no-fold``: :class:`mlfop.MLFOPSOAP` stepped on ``p.grad`` without folds (plain
  SOAP by contract);
- ``MLFOPSOAP-two-streams``: :class:`mlfop.MLFOPSOAP` whose every step first folds the gradient
  it is given as two streams that disagree: ``a = g * m`` (a fixed random mask ``m`` in [0, 1)
  per shape) as ``"image"``, then ``g - a`` as ``"text"``, through the public ``fold`` API (after
  ``zero_grad``, so a refused step leaves nothing pending). Its step then runs the whole
  Fisher-orthogonal path: the rescale check, the combination, the streams' statistics.

A test takes the ``info`` fixture and builds its optimizers with ``info.make(params, **kwargs)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

import mlfop


def _mask(shape: torch.Size) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(7 + len(shape) * 1000 + shape.numel()))


class TwoStreamMLFOPSOAP(mlfop.MLFOPSOAP):
    """``MLFOPSOAP`` that folds each step's gradient as two disagreeing streams before stepping."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            self._fold_as_two_streams()
            return super().step()

        def folded() -> Any:  # the closure's backward fills p.grad, then the folds
            loss = closure()
            self._fold_as_two_streams()
            return loss

        return super().step(folded)

    @torch.no_grad()
    def _fold_as_two_streams(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        grads = {p: p.grad for p in params if p.grad is not None}
        if grads and not any(g.is_sparse for g in grads.values()):
            self.zero_grad()
            for param, grad in grads.items():
                param.grad = grad * _mask(grad.shape).to(grad.dtype)
            self.fold("image")
            for param, grad in grads.items():
                param.grad.add_(grad - param.grad)
            self.fold("text")


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type

    def make(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return self.cls(params, **kwargs)

    @property
    def folds(self) -> bool:
        return self.cls is TwoStreamMLFOPSOAP

    @property
    def per_group(self) -> dict[str, Any]:
        """Arguments that make the param groups independent: the global level couples them
        (one optimizer-wide beta_G serves the 1-D parameters of every group)."""
        return {"levels": ("layer", "head")} if self.folds else {}


OPTIMIZERS = [
    OptimizerInfo("SOAP", mlfop.SOAP),
    OptimizerInfo("MLFOPSOAP-no-fold", mlfop.MLFOPSOAP),
    OptimizerInfo("MLFOPSOAP-two-streams", TwoStreamMLFOPSOAP),
]
