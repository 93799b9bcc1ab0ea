"""Shared by the engine tests: a tiny random Llama, ordered mixed-stream examples, a reference
accumulation loop with ``fold()``, and a parameter distance."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mlfop
from mlfop.integrations.batch_streams import loss_tokens

STREAMS = ("image", "text")
MICRO, ACCUM, SEQ = 2, 4, 16
# One stream per micro-batch, both streams in every optimizer step, unequal token counts.
PATTERN = ["image", "text", "text", "image", "text", "text", "image", "text",
           "image", "image", "text", "image", "text", "image", "text", "text"]
OPT_KWARGS = dict(streams=STREAMS, lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, precondition_frequency=1)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config).float()


def make_examples(steps: int, stream_as_id: bool = False) -> list[dict]:
    """``steps * ACCUM`` micro-batches of MICRO examples, in order; a varying prompt is masked."""
    generator = torch.Generator().manual_seed(1)
    examples = []
    for i in range(steps * ACCUM * MICRO):
        stream = PATTERN[(i // MICRO) % len(PATTERN)]
        ids = torch.randint(0, 64, (SEQ,), generator=generator)
        labels = ids.clone()
        labels[: 1 + (3 * i) % 11] = -100  # 1..11 prompt tokens without loss
        examples.append({"input_ids": ids, "labels": labels, "stream": STREAMS.index(stream) if stream_as_id else stream})
    return examples


def mixed_examples(count: int, seed: int = 2) -> list[dict]:
    """``count`` examples whose streams are mixed at random (about 2 image : 1 text), as in a real
    dataset: no micro-batch of consecutive examples is single-stream."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        ids = torch.randint(0, 64, (SEQ,), generator=generator)
        labels = ids.clone()
        labels[: 1 + (5 * i) % 9] = -100
        stream = STREAMS[int(torch.rand((), generator=generator) < 1 / 3)]
        examples.append({"input_ids": ids, "labels": labels, "stream": stream})
    return examples


def in_sampler_order(examples: list[dict], sampler) -> list[dict]:
    """The examples in the order of ``sampler``'s micro-batches of this epoch (MICRO each)."""
    batches = [indices for _, indices in sampler.micro_batches()]
    assert all(len(indices) == MICRO for indices in batches)
    return [examples[i] for indices in batches for i in indices]


def hand_loop(base_model, examples, steps=None, clip=None, tokens=False, bf16=False):
    """Per-micro-batch mean loss / ACCUM, fold, clip, step: returns (model, pre-clip norms)."""
    model = copy.deepcopy(base_model)
    opt = mlfop.MLFOPSOAP(model.parameters(), **OPT_KWARGS)
    batches = [examples[i : i + MICRO] for i in range(0, len(examples), MICRO)]
    norms = []
    for step in range(len(batches) // ACCUM if steps is None else steps):
        for j in range(ACCUM):
            mb = batches[(step * ACCUM + j) % len(batches)]
            ids = torch.stack([e["input_ids"] for e in mb])
            labels = torch.stack([e["labels"] for e in mb])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=labels).loss
            (loss / ACCUM).backward()
            opt.fold(mb[0]["stream"], tokens=loss_tokens(labels) if tokens else None)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)))
        opt.step()
        opt.zero_grad()
    return model, norms


def poison_second_step(model: torch.nn.Module) -> None:
    """Make the gradient of the first micro-batch of the second optimizer step non-finite (inf
    in ``lm_head.weight``), through a hook on that weight."""
    calls = []

    def poison(grad):
        calls.append(None)
        return torch.full_like(grad, math.inf) if len(calls) == ACCUM + 1 else grad

    model.lm_head.weight.register_hook(poison)


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p.detach() - q.detach()).norm() / q.detach().norm().clamp_min(1e-30))
        for p, q in zip(a.parameters(), b.parameters())
    )


def run_example(script, cwd) -> str:
    """Run an example script in ``cwd`` with this checkout's mlfop; return its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(mlfop.__file__).parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout
