r"""Hierarchical folding: per-stream gradient sums taken out of ordinary gradient accumulation.

The fold contract: ``p.grad`` keeps accumulating the total, as in any PyTorch loop, and a fold
records, per stream, what was added since the previous fold. With stream sums :math:`S_j`
(one stacked buffer of K slices per parameter) a fold of stream :math:`k` is

.. math::
    S_k \leftarrow \texttt{p.grad} - \textstyle\sum_{j \ne k} S_j

(:math:`\texttt{p.grad} = \sum_j S_j + \text{micro}` before the fold), one elementwise pass for
K = 2 and no communication. So everything that reads ``p.grad`` before ``step()`` keeps working
(DDP's own sync of the last micro-batch, ``clip_grad_norm_``, ``GradScaler``, grad-norm logging),
and :math:`\sum_k S_k = \texttt{p.grad}` up to a global rescale, which ``step()`` recovers.

At the step, stream :math:`k`'s gradient is :math:`g_k = S_k / a_k`, with :math:`a_k` its natural
share: its fraction of the step's loss tokens (``fold(..., tokens=n)``) or, without token
counts, of its micro-batches. With the natural weights :math:`w_k = a_k`,
:math:`\sum_k w_k g_k = \sum_k S_k` is exactly the accumulated gradient, whatever loss
normalisation the loop used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

import torch
from torch import Tensor

from mlfop.functional.heads import split_heads

__all__ = ["StreamFolds", "UNTAGGED_STREAMS"]

UNTAGGED_STREAMS = ("even", "odd")


class StreamFolds:
    """The folds of one optimizer step: stacked stream sums and per-stream counts.

    With ``track_norms`` each fold also keeps, per parameter and stream, the sum of squared
    norms of the folded micro-gradients (level 0 of the hierarchy: scalars only), per head for
    the parameters in ``head_layouts``: the input of the noise estimate at the step.
    """

    def __init__(
        self, names: tuple[str, ...], track_norms: bool = False, head_layouts: dict[Tensor, tuple[int, int]] | None = None
    ) -> None:
        self.names = names
        self.index = {name: k for k, name in enumerate(names)}
        self.track_norms = track_norms
        self.head_layouts = head_layouts or {}
        self.reset()

    def reset(self) -> None:
        """Forget this step's folds (after ``step()`` or ``zero_grad()``)."""
        self.buffers: dict[Tensor, Tensor] = {}
        self.micro_sq: dict[Tensor, Tensor] = {}  # (K, heads or 1) float64 sums of |micro|^2
        self.norm_counts = [0] * len(self.names)  # micro-batches whose norms are in micro_sq
        self._last_norms: dict[Tensor, Tensor] = {}  # the latest fold's, not yet in micro_sq
        self.last_stream = -1
        self.micro_batches = [0] * len(self.names)
        self.tokens = [0.0] * len(self.names)
        self.tokens_given: bool | None = None
        self.reduced = False  # set once the sums were averaged across data-parallel ranks

    @property
    def active(self) -> bool:
        """Whether any fold happened since the last reset."""
        return any(self.micro_batches)

    def resolve(self, stream: str | None) -> int:
        """Index of ``stream``; ``None`` alternates between the two untagged streams."""
        if stream is None:
            if self.names != UNTAGGED_STREAMS:
                raise ValueError(
                    f"fold() needs a stream name, one of {list(self.names)}; untagged folding "
                    f"(stream=None) is for optimizers built with streams=None"
                )
            return sum(self.micro_batches) % 2
        if stream not in self.index:
            raise ValueError(
                f"unknown stream {stream!r}; this optimizer was built with streams={list(self.names)}: "
                f"fold one of those, or add the name to streams="
            )
        return self.index[stream]

    def fold(self, stream: str | None, params: Iterable[Tensor], tokens: Real | Tensor | None) -> None:
        """Record what the last micro-batch(es) added to ``p.grad`` as stream ``stream``."""
        k = self.resolve(stream)
        token_count = _check_tokens(tokens)
        if self.tokens_given is not None and self.tokens_given != (token_count is not None):
            raise ValueError(
                "fold(tokens=...) must be given for every fold of a step or for none; "
                "pass the number of loss tokens of each micro-batch, or leave tokens out everywhere"
            )
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            raise ValueError(
                "fold() found no gradient on any parameter; call it after loss.backward() of the "
                "micro-batch, before optimizer.zero_grad()"
            )
        for param in with_grad:
            if param.grad.layout != torch.strided:
                raise TypeError("fold() does not support sparse gradients; use dense ones")
        self.commit_last_norms()
        for param in with_grad:
            self._fold_param(param, k)
        self.micro_batches[k] += 1
        self.last_stream = k
        self.tokens_given = token_count is not None
        if token_count is not None:
            self.tokens[k] += token_count

    def _fold_param(self, param: Tensor, k: int) -> None:
        buffer = self.buffers.get(param)
        if buffer is None:
            dtype = torch.promote_types(param.dtype, torch.float32)
            buffer = torch.zeros((len(self.names), *param.shape), dtype=dtype, device=param.device)
            self.buffers[param] = buffer
        if self.track_norms:
            micro = param.grad - buffer.sum(0)
            self._add_micro_norms(param, k, micro)
            buffer[k].add_(micro)
            return
        others = [j for j in range(len(self.names)) if j != k]
        torch.sub(param.grad, buffer[others[0]], out=buffer[k])
        for j in others[1:]:
            buffer[k].sub_(buffer[j])

    def _add_micro_norms(self, param: Tensor, k: int, micro: Tensor) -> None:
        layout = self.head_layouts.get(param)
        if layout is None:
            norms = micro.square().sum().reshape(1)
        else:
            norms = split_heads(micro, *layout).square().flatten(1).sum(1)
        self._last_norms[param] = norms.double().cpu()

    def commit_last_norms(self, keep: bool = True) -> None:
        """Add the latest fold's micro norms to the sums (``keep``), or drop them.

        Under DDP the last micro-batch before the step is the synced one: its "micro-gradient"
        is the rank average minus this rank's earlier folds, not a sample, so it is dropped.
        """
        if self._last_norms and keep:
            for param, norms in self._last_norms.items():
                sums = self.micro_sq.get(param)
                if sums is None:
                    sums = torch.zeros(len(self.names), norms.numel(), dtype=torch.float64)
                    self.micro_sq[param] = sums
                sums[self.last_stream] += norms
            self.norm_counts[self.last_stream] += 1
        self._last_norms = {}

    def present(self) -> list[int]:
        """Indices of the streams folded at least once this step."""
        return [k for k, n in enumerate(self.micro_batches) if n > 0]

    def present_sums(self, param: Tensor, present: list[int]) -> Tensor:
        """Stacked sums of the present streams for ``param`` (a view when all are present)."""
        buffer = self.buffers[param]
        return buffer if len(present) == len(self.names) else buffer[present]

    def shares(self, present: list[int]) -> list[float]:
        """Natural shares ``a_k`` of the present streams (tokens, else micro-batches)."""
        counts = self.tokens if self.tokens_given else [float(n) for n in self.micro_batches]
        total = sum(counts[k] for k in present)
        return [counts[k] / total for k in present]

    def buffer_bytes(self) -> int:
        """Bytes held in stream buffers (at most K gradient-sized buffers per parameter)."""
        return sum(buffer.nbytes for buffer in self.buffers.values())


def _check_tokens(tokens: Real | Tensor | None) -> float | None:
    if tokens is None:
        return None
    if isinstance(tokens, Tensor):
        if tokens.numel() != 1:
            raise ValueError(f"tokens must be a single number, got a tensor of shape {tuple(tokens.shape)}")
        tokens = tokens.item()
    if isinstance(tokens, bool) or not isinstance(tokens, Real) or not 0 < tokens < math.inf:
        raise ValueError(
            f"tokens must be a positive number (the micro-batch's loss-token count), got {tokens!r}; "
            f"leave tokens out to weight streams by micro-batch counts"
        )
    return float(tokens)
