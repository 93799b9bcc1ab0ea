"""fold_losses: a micro-batch that mixes K = 3 streams, split by stream, equals the same examples
folded as separate single-stream micro-batches (float64, so rounding stays near 1e-15)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mlfop

STREAMS = ("t2i", "i2t", "text")
STEPS, ACCUM, MICRO, WIDTH = 3, 2, 7, 5
# Per micro-batch, the stream of each example (the second micro-batch has no "text").
TAGS = [["t2i", "i2t", "text", "t2i", "t2i", "i2t", "text"], ["i2t", "t2i", "i2t", "i2t", "t2i", "t2i", "t2i"]]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, WIDTH)).double()


def optimizer(net: nn.Module, streams=STREAMS) -> mlfop.MLFOPSOAP:
    return mlfop.MLFOPSOAP(net.parameters(), streams=streams, lr=1e-2, precondition_frequency=1)


def micro_batches(step: int):
    """ACCUM micro-batches of (x, y, mask, tags); ``mask`` marks each example's loss tokens (1..WIDTH)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for tags in TAGS:
        x = torch.randn(MICRO, 6, generator=gen, dtype=torch.float64)
        shift = torch.tensor([STREAMS.index(t) - 1.0 for t in tags], dtype=torch.float64)[:, None]
        y = shift * x[:, :WIDTH].flip(1) + 0.1 * torch.randn(MICRO, WIDTH, generator=gen, dtype=torch.float64)
        mask = torch.arange(WIDTH)[None, :] < torch.randint(1, WIDTH + 1, (MICRO, 1), generator=gen)
        out.append((x, y, mask, tags))
    return out


def part_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: str, step_tokens: int) -> torch.Tensor:
    """One stream's part of a micro-batch's loss: ``per_token`` and ``mask`` are its rows only."""
    if norm == "token_sum":  # a token sum over the step's loss tokens
        return (per_token * mask).sum() / step_tokens
    if norm == "stream_mean":  # a mean over the part's tokens, per accumulated micro-batch
        return (per_token * mask).sum() / mask.sum() / ACCUM
    per_example = (per_token * mask).sum(1) / mask.sum(1)  # "example_mean": mean of per-example means
    return per_example.mean() / ACCUM


def train(norm: str, route: str) -> list[torch.Tensor]:
    net = model()
    opt = optimizer(net)
    for step in range(STEPS):
        batches = micro_batches(step)
        step_tokens = int(sum(mask.sum() for _, _, mask, _ in batches))
        for x, y, mask, tags in batches:
            rows = {name: torch.tensor([t == name for t in tags]) for name in STREAMS}
            counts = {name: int(mask[rows[name]].sum()) for name in STREAMS}
            tokens = counts if norm == "token_sum" else None
            if route == "separate":  # one single-stream micro-batch per stream
                for name in STREAMS:
                    if counts[name]:
                        r = rows[name]
                        per_token = (net(x[r]) - y[r]).pow(2)
                        part_loss(per_token, mask[r], norm, step_tokens).backward()
                        opt.fold(name, tokens=counts[name] if tokens else None)
                continue
            per_token = (net(x) - y).pow(2)  # one forward of the mixed micro-batch
            present = [name for name in STREAMS if counts[name] or tokens]  # zero-token parts: given, not folded
            losses = {name: part_loss(per_token[rows[name]], mask[rows[name]], norm, step_tokens) for name in present}
            if route == "fold_losses":
                mlfop.fold_losses(opt, losses, tokens)
            elif route == "method":
                opt.fold_losses(losses, tokens)
            else:  # "one_stream": the whole micro-batch folded as one stream, what the test must tell apart
                sum(losses.values()).backward()
                opt.fold(tags[0], tokens=sum(counts.values()) if tokens else None)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


def distance(a, b) -> float:
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))


@pytest.mark.parametrize("norm", ["token_sum", "stream_mean", "example_mean"])
def test_equals_separate_single_stream_micro_batches(norm):
    separate = train(norm, "separate")
    start = [p.detach() for p in model().parameters()]
    assert distance(separate, start) > 1e-3  # it trained
    assert distance(train(norm, "fold_losses"), separate) < 1e-12
    assert distance(train(norm, "method"), separate) < 1e-12
    assert distance(train(norm, "one_stream"), separate) > 1e-3  # measured 3e-2; the routes agree to 3e-14


def test_p_grad_ends_with_the_whole_micro_batch_gradient():
    net = model()
    opt = optimizer(net)
    x, y, mask, tags = micro_batches(0)[0]
    per_token = (net(x) - y).pow(2) * mask
    rows = {name: torch.tensor([t == name for t in tags]) for name in STREAMS}
    losses = {name: per_token[rows[name]].sum() for name in STREAMS}
    mlfop.fold_losses(opt, losses)
    folded = [p.grad.clone() for p in net.parameters()]
    whole = torch.autograd.grad((net(x) - y).pow(2).mul(mask).sum(), list(net.parameters()))
    for a, b in zip(folded, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused_before_any_backward():
    net = model()
    opt = optimizer(net)
    x, y, mask, _ = micro_batches(0)[0]
    loss = (net(x) - y).pow(2).sum()
    cases = [
        ({"audio": loss}, None, "not the optimizer's streams"),
        ({"t2i": loss}, {"t2i": 3, "text": 1}, "a count for each stream of losses"),
        ({"t2i": loss}, {"t2i": -1}, r"tokens\['t2i'\] must be a finite number >= 0"),
        ({"t2i": loss.detach()}, None, "requires grad"),
        ({}, None, "non-empty mapping"),
    ]
    for losses, tokens, match in cases:
        with pytest.raises(ValueError, match=match):
            mlfop.fold_losses(opt, losses, tokens)
        assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="named streams"):
        mlfop.fold_losses(optimizer(net, streams=None), {"even": loss})
