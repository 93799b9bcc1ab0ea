r"""Streams out of one micro-batch that mixes them: one forward, one backward per stream.

When a micro-batch mixes streams (per-example tags, or Emu3-style sequences with text and image
tokens in one sequence), split its loss by stream, :math:`\ell = \sum_k \ell_k`, and fold each
part::

    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    is_image = image_token_mask.flatten()
    mlfop.fold_losses(opt, {"image": per_token[is_image].sum() / step_tokens,
                            "text": per_token[~is_image].sum() / step_tokens},
                      tokens={"image": int(is_image.sum()), "text": int((~is_image).sum())})

Each :math:`\ell_k` must be what a micro-batch of only stream k's part would add to the loop's
loss (the same normalisation: a token sum over the step's tokens with ``tokens=``, or a mean
over the part divided by the accumulation steps without). Then the folds equal those of the
same examples folded as separate single-stream micro-batches: :math:`\nabla \ell_k` is exactly
what that part contributes, and ``p.grad`` ends with :math:`\nabla \ell`, as after
``loss.backward()``.

Cost: one forward and K backward passes of the whole micro-batch (a backward costs the same
whatever share of the rows carries loss), against K forwards and K backwards of the K smaller
single-stream micro-batches of :class:`mlfop.data.StreamBatchSampler`; measured in
``docs/results.md``. The graph is kept until the last backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from mlfop.folding import UNTAGGED_STREAMS
from mlfop.fully_sharded import is_sharded

__all__ = ["fold_losses"]


def fold_losses(optimizer: Any, losses: Mapping[str, Tensor], tokens: Mapping[str, Real | Tensor] | None = None) -> None:
    """Back-propagate each stream's loss of one micro-batch and fold it into its stream.

    Args:
        optimizer: an :class:`mlfop.MLFOPSOAP` with named streams.
        losses: ``{stream: scalar loss}`` of this micro-batch; a stream it does not contain is
            left out. They are folded in the optimizer's stream order.
        tokens: ``{stream: loss-token count}`` for the same streams, or ``None`` (each part
            then counts as one micro-batch, as a fold without ``tokens=``). A stream with 0
            tokens is not folded (its part added nothing).

    The first K - 1 parts are differentiated with ``torch.autograd.grad`` and added to
    ``p.grad``; the last with ``backward()``, which also carries the other parts with a zero
    gradient, so that every parameter any part reaches gets its gradient hook. So under DDP
    exactly one backward of the micro-batch runs DDP's hooks: run the forward inside
    ``ddp.no_sync()`` for all micro-batches but the last of the step, as usual, and the sync
    comes with the last micro-batch's last fold. ``step()`` needs the ranks to fold alike (the
    same number of folds per stream, the same last stream), so each rank's j-th micro-batch
    must hold the same streams, in any proportions: true of Emu3-style sequences that all carry
    both modalities; per-example tags that vary by rank are refused there, on every rank, and
    are better batched with :class:`mlfop.data.StreamBatchSampler`. Hooks that fire on
    gradient accumulation (``register_post_accumulate_grad_hook``) see the last part only.
    Parameters sharded as DTensors (FSDP2) are refused: use the sampler there too.
    """
    names = tuple(optimizer.streams)
    if names == UNTAGGED_STREAMS:
        raise ValueError(
            "fold_losses needs an optimizer with named streams (MLFOPSOAP(..., streams=('image', 'text'))); "
            "an untagged run (streams=None) has no stream to split a loss into"
        )
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(f"losses must be a non-empty mapping {{stream: loss}}, got {losses!r}")
    unknown = [name for name in losses if name not in names]
    if unknown:
        raise ValueError(f"losses names streams {unknown} that are not the optimizer's streams {list(names)}")
    for name, loss in losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(
                f"losses[{name!r}] must be a scalar tensor that requires grad (computed from the model's "
                f"output with autograd enabled), got {loss!r}"
            )
    counts = _token_counts(tokens, losses)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    sharded = [tuple(p.shape) for p in params if is_sharded(p)]
    if sharded:
        raise ValueError(
            f"fold_losses does not support sharded (DTensor, FSDP2) parameters (shapes {sharded[:3]}): its "
            f"partial backward passes bypass FSDP's gradient reduction. Batch each stream on its own with "
            f"mlfop.data.StreamBatchSampler instead"
        )
    order = [name for name in names if name in losses and (counts is None or counts[name] > 0)]
    last = order[-1] if order else None
    for name in order[:-1]:
        grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
        for p, grad in zip(params, grads):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = torch.empty_like(p).copy_(grad)  # p's layout, as autograd's accumulation keeps it
            else:
                p.grad.add_(grad)
        optimizer.fold(name, tokens=None if counts is None else counts[name])
    seeds = [torch.ones_like(loss) if name == last else torch.zeros_like(loss) for name, loss in losses.items()]
    torch.autograd.backward(list(losses.values()), grad_tensors=seeds)
    if last is not None:
        optimizer.fold(last, tokens=None if counts is None else counts[last])


def _token_counts(tokens: Mapping[str, Real | Tensor] | None, losses: Mapping[str, Tensor]) -> dict[str, float] | None:
    """``tokens`` as plain numbers for exactly the streams of ``losses`` (or ``None``)."""
    if tokens is None:
        return None
    if not isinstance(tokens, Mapping) or set(tokens) != set(losses):
        given = sorted(tokens) if isinstance(tokens, Mapping) else tokens
        raise ValueError(
            f"tokens must give a count for each stream of losses, {sorted(losses)}, and no other; got {given!r}"
        )
    counts = {}
    for name, count in tokens.items():
        value = count.item() if isinstance(count, Tensor) and count.numel() == 1 else count
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < float("inf"):
            raise ValueError(f"tokens[{name!r}] must be a finite number >= 0, got {count!r}")
        counts[name] = value
    return counts
