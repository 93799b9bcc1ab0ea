"""examples/emu3_interleaved.py: fold_losses splits the per-token loss of interleaved text+image
sequences into an image and a text stream; the split gradients add up to the whole."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

import mlfop
from tiny_llama import run_example

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "emu3_interleaved.py"
spec = importlib.util.spec_from_file_location("emu3_interleaved", EXAMPLE)
emu3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emu3)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def relative(a, b) -> float:
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


def setup(micro_batches=2, size=4):
    model = emu3.build_model().double()
    generator = torch.Generator().manual_seed(3)
    batches = [emu3.interleaved_batch(size, generator) for _ in range(micro_batches)]
    return model, batches, sum(ids[:, 1:].numel() for ids in batches)


def test_sequences_interleave_both_modalities():
    _, batches, _ = setup()
    image = emu3.is_image_token(batches[0][:, 1:])
    assert image.any(1).all() and (~image).any(1).all()  # every sequence has loss on both
    first_image = image.float().argmax(1)
    assert ((~image).int().flip(1).argmax(1) < image.shape[1] - 1 - first_image).all()  # text after the image too


def test_split_gradients_sum_to_the_whole():
    model, batches, step_tokens = setup()
    params = list(model.parameters())
    ids = batches[0]
    losses, tokens = emu3.stream_losses(model, ids, step_tokens)
    assert sum(tokens.values()) == ids[:, 1:].numel()
    g_image = torch.autograd.grad(losses["image"], params, retain_graph=True)
    g_text = torch.autograd.grad(losses["text"], params)
    logits = model(input_ids=ids).logits[:, :-1]
    whole = F.cross_entropy(logits.reshape(-1, emu3.VOCAB), ids[:, 1:].reshape(-1), reduction="sum") / step_tokens
    g_whole = torch.autograd.grad(whole, params)
    # Llama's RMSNorm computes in float32 even in a float64 model, so the sum is exact to float32
    # rounding (measured 1.5e-8), not float64's.
    assert relative([a + b for a, b in zip(g_image, g_text)], g_whole) < 1e-6
    cosine = torch.nn.functional.cosine_similarity(flat(g_image), flat(g_text), dim=0)
    assert abs(float(cosine)) < 0.9  # two different gradients, not one split in proportion

    # fold_losses leaves the whole gradient in p.grad, as loss.backward() would.
    opt = mlfop.MLFOPSOAP(params, streams=("image", "text"))
    opt.fold_losses(*emu3.stream_losses(model, ids, step_tokens))
    assert relative([p.grad for p in params], g_whole) < 1e-6


def test_fold_losses_folds_each_modality_into_its_stream():
    """Two steps: fold_losses equals a backward and a fold per stream by hand, and differs from
    folding each micro-batch whole into one stream."""

    def train(route):
        model, _, _ = setup()
        opt = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text"), lr=1e-2, precondition_frequency=1)
        for step in range(2):
            generator = torch.Generator().manual_seed(10 + step)
            batches = [emu3.interleaved_batch(4, generator) for _ in range(2)]
            step_tokens = sum(ids[:, 1:].numel() for ids in batches)
            for j, ids in enumerate(batches):
                losses, tokens = emu3.stream_losses(model, ids, step_tokens)
                if route == "fold_losses":
                    opt.fold_losses(losses, tokens)
                elif route == "by_hand":
                    losses["image"].backward(retain_graph=True)
                    opt.fold("image", tokens=tokens["image"])
                    losses["text"].backward()
                    opt.fold("text", tokens=tokens["text"])
                else:  # "whole": micro-batch j as one stream
                    sum(losses.values()).backward()
                    opt.fold(("image", "text")[j], tokens=sum(tokens.values()))
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()]

    reference = train("by_hand")
    assert relative(train("fold_losses"), reference) < 1e-12
    assert relative(train("whole"), reference) > 1e-3  # measured 6e-2


def test_example_script_runs(tmp_path):
    assert "trained" in run_example(EXAMPLE, tmp_path)
