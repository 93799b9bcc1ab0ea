"""The training objective: per-stream NLL sums and how one step's micro-batches are weighted.

A step is ``batch / micro_batch`` micro-batches, each holding one stream (``gen``, ``und`` or
``text``), interleaved. Micro-batch ``j`` of stream ``k`` contributes ``scale_k * NLL_sum_j`` to
the step's loss, with ``scale_k = c_k / tokens_k`` (``tokens_k``: the stream's loss tokens in
the whole step), so the accumulated gradient is that of ``sum_k c_k L_k`` with ``L_k`` the
stream's mean NLL per token (see :class:`mlfop.bench.config.RunConfig` for ``c_k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mlfop.bench import vocab
from mlfop.bench.config import RunConfig
from mlfop.bench.data import Batch
from mlfop.bench.models import TinyModel

__all__ = ["StepPlan", "make_plan", "stream_nll", "digit_logits", "tokens_per_sequence"]

@dataclass(frozen=True)
class StepPlan:
    """The micro-batches of every step, in order, and their loss scales."""

    micro: tuple[tuple[str, int], ...]  # (stream, index within the stream)
    size: int  # sequences per micro-batch
    scales: dict[str, float]  # micro-batch loss = scales[stream] * NLL sum
    tokens: dict[str, int]  # loss tokens of one micro-batch of each stream
    shares: dict[str, float]  # c_k, the weight of each stream's mean NLL in the objective
    step_tokens: dict[str, int]  # loss tokens of each stream in one step

def tokens_per_sequence(stream: str, image_tokens: int) -> int:
    """Loss tokens of one sequence: the image codes, the answer word, or the text sentence."""
    return {"gen": image_tokens, "und": 1, "text": vocab.TEXT_LOSS_TOKENS}[stream]

def make_plan(config: RunConfig, image_tokens: int) -> StepPlan:
    """Round-robin order of the streams' micro-batches, with the scales of the objective."""
    counts = config.micro_batches()
    order: list[tuple[str, int]] = []
    for index in range(max(counts.values())):
        order += [(stream, index) for stream, count in counts.items() if index < count]
    size = config.micro_batch
    tokens = {k: size * tokens_per_sequence(k, image_tokens) for k in counts}
    step_tokens = {k: counts[k] * tokens[k] for k in counts}
    if config.loss_weighting == "task":
        shares = {k: counts[k] / sum(counts.values()) for k in counts}
    else:
        shares = {k: step_tokens[k] / sum(step_tokens.values()) for k in counts}
    scales = {k: shares[k] / step_tokens[k] for k in counts}
    return StepPlan(tuple(order), size, scales, tokens, shares, step_tokens)

def stream_nll(model: TinyModel, stream: str, batch: Batch) -> Tensor:
    """Sum of the NLL (nats) over the stream's loss tokens in ``batch``."""
    if stream == "gen":
        logits, targets = model.gen_logits(batch)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    if stream == "und":
        return F.cross_entropy(model.und_logits(batch), vocab.digit_ids()[batch.labels], reduction="sum")
    ids = vocab.text_ids(batch.pairs)
    return F.cross_entropy(model.text_logits(ids).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")

def digit_logits(logits: Tensor) -> Tensor:
    """The ten digit words' columns of full-vocabulary logits."""
    return logits[:, vocab.digit_ids()]
