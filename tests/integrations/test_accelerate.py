"""StreamFolding in an ``accelerator.accumulate`` loop against a hand-written loop with fold() (CPU)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import mlfop
from tiny_llama import (
    ACCUM,
    MICRO,
    OPT_KWARGS,
    STREAMS,
    hand_loop,
    in_sampler_order,
    make_examples,
    max_rel_diff,
    mixed_examples,
    poison_second_step,
    run_example,
)
from mlfop.data import StreamBatchSampler, stream_column
from mlfop.integrations.accelerate import (
    StreamFolding,
    fold_after_backward,
    loss_tokens,
    prepare_stream_loader,
    unwrap_optimizer,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_loop.py"


def fresh_accelerator(**kwargs) -> Accelerator:  # accelerate's state is a process-wide singleton
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, gradient_accumulation_steps=ACCUM, **kwargs)


def accelerate_run(base_model, examples, clip=None, tokens=False, save_at=None, save_dir=None, resume=None, setup=None,
                   mixed_precision=None, by_stream=False):
    """The user's loop; returns (model, pre-clip norms, optimizer). ``by_stream``: the examples
    are mixed, batched by a StreamBatchSampler (seed 5)."""
    accelerator = fresh_accelerator(mixed_precision=mixed_precision)
    model = copy.deepcopy(base_model)
    if setup is not None:
        setup(model)
    optimizer = mlfop.MLFOPSOAP(model.parameters(), **OPT_KWARGS)
    if by_stream:
        sampler = StreamBatchSampler(stream_column(examples), MICRO, accumulation_steps=ACCUM, seed=5)
        loader = prepare_stream_loader(accelerator, torch.utils.data.DataLoader(examples, batch_sampler=sampler))
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        loader = torch.utils.data.DataLoader(examples, batch_size=MICRO, shuffle=False)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if resume is not None:
        accelerator.load_state(str(resume))
    folding = StreamFolding(optimizer)
    norms, real_steps = [], 0
    for batch in loader:
        with accelerator.accumulate(model):
            stream = folding.pop_stream(batch)
            loss = model(**batch).loss
            accelerator.backward(loss)
            folding.fold(stream, tokens=loss_tokens(batch["labels"]) if tokens else None)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip if clip else math.inf)))
            optimizer.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                real_steps += 1
                if save_at == real_steps:
                    accelerator.save_state(str(save_dir))
    return accelerator.unwrap_model(model), norms, optimizer


def test_matches_hand_loop_with_and_without_clipping_and_tokens(base_model):
    examples = make_examples(3)
    model, norms, optimizer = accelerate_run(base_model, examples)
    reference, ref_norms = hand_loop(base_model, examples)
    assert max_rel_diff(model, reference) < 1e-6
    assert max_rel_diff(model, base_model) > 1e-3  # it trained
    assert norms == pytest.approx(ref_norms, rel=1e-6)  # the accumulated gradient's norm
    inner = unwrap_optimizer(optimizer)
    assert inner is optimizer.optimizer and set(inner.diagnostics()["streams"]) == set(STREAMS)

    clip = 0.05
    clipped, clipped_norms, _ = accelerate_run(base_model, examples, clip=clip)
    clipped_ref, clipped_ref_norms = hand_loop(base_model, examples, clip=clip)
    assert min(clipped_ref_norms) > 10 * clip  # clipping fires every step
    assert max_rel_diff(clipped, clipped_ref) < 1e-6
    assert max_rel_diff(clipped, reference) > 1e-4  # and changes the result
    assert clipped_norms == pytest.approx(clipped_ref_norms, rel=1e-6)

    by_tokens, _, _ = accelerate_run(base_model, make_examples(3, stream_as_id=True), tokens=True)
    by_tokens_ref, _ = hand_loop(base_model, examples, tokens=True)
    assert max_rel_diff(by_tokens, by_tokens_ref) < 1e-6
    assert max_rel_diff(by_tokens, reference) > 1e-7  # token shares differ from micro-batch shares

    bf16, bf16_norms, _ = accelerate_run(base_model, examples, mixed_precision="bf16")
    bf16_ref, bf16_ref_norms = hand_loop(base_model, examples, bf16=True)
    assert max_rel_diff(bf16, bf16_ref) < 1e-6
    assert max_rel_diff(bf16, reference) > 1e-6  # autocast really ran
    assert bf16_norms == pytest.approx(bf16_ref_norms, rel=1e-6)


def test_save_state_load_state_resumes_exactly(base_model, tmp_path):
    examples = make_examples(4)
    full, _, _ = accelerate_run(base_model, examples)
    accelerate_run(base_model, examples[: 2 * ACCUM * MICRO], save_at=2, save_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt").is_dir()
    # A fresh model and optimizer; load_state restores both, then the last two steps run.
    resumed, _, optimizer = accelerate_run(base_model, examples[2 * ACCUM * MICRO :], resume=tmp_path / "ckpt")
    assert max_rel_diff(resumed, full) < 1e-6
    assert max_rel_diff(resumed, base_model) > 1e-3

    # Mid-accumulation, the save is refused with a message that says where to save.
    accelerator = fresh_accelerator()
    model = copy.deepcopy(base_model)
    model, optimizer = accelerator.prepare(model, mlfop.MLFOPSOAP(model.parameters(), **OPT_KWARGS))
    batch = {k: torch.stack([e[k] for e in examples[:MICRO]]) for k in ("input_ids", "labels")}
    with accelerator.accumulate(model):
        accelerator.backward(model(**batch).loss)
        fold_after_backward(optimizer, "image")
        optimizer.step()  # a no-op: not a sync micro-batch
        optimizer.zero_grad()  # also a no-op: the fold survives
    assert unwrap_optimizer(optimizer).accumulating
    with pytest.raises(RuntimeError, match="between fold"):
        accelerator.save_state(str(tmp_path / "mid"))


def test_missing_or_bad_stream_is_a_clear_error(base_model):
    optimizer = mlfop.MLFOPSOAP(copy.deepcopy(base_model).parameters(), **OPT_KWARGS)
    folding = StreamFolding(optimizer)
    with pytest.raises(KeyError, match="no 'stream' key"):
        folding.pop_stream({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="no 'modality' key"):
        StreamFolding(optimizer, stream_key="modality").stream_of({"stream": "image"})
    with pytest.raises(ValueError, match="mixes the streams"):
        folding.stream_of({"stream": ["image", "text"]})
    with pytest.raises(ValueError, match="not one of"):
        folding.stream_of({"stream": "audio"})
    assert folding.stream_of({"stream": torch.tensor([1, 1])}) == "text"
    assert StreamFolding(optimizer, stream_names={"img": "image"}).stream_of({"stream": ["img"]}) == "image"
    with pytest.raises(TypeError, match="MLFOPSOAP"):
        StreamFolding(torch.optim.SGD(base_model.parameters(), lr=0.1))


def test_example_script_runs(tmp_path):
    assert "trained" in run_example(EXAMPLE, tmp_path)


def test_skipped_step_ends_the_accumulation(base_model, tmp_path):
    """A step refused for a non-finite gradient: the synced zero_grad() forgets its folds, so save_state works."""

    with pytest.warns(RuntimeWarning, match="skipped a step"):
        _, _, optimizer = accelerate_run(base_model, make_examples(3), save_at=2, save_dir=tmp_path / "ckpt",
                                         setup=poison_second_step)
    assert unwrap_optimizer(optimizer).skipped_steps == 1
    assert (tmp_path / "ckpt").is_dir()


def test_mixed_dataset_through_the_sampler_matches_hand_loop(base_model):
    examples = mixed_examples(48)
    model, _, _ = accelerate_run(base_model, examples, by_stream=True)
    sampler = StreamBatchSampler(stream_column(examples), MICRO, accumulation_steps=ACCUM, seed=5)
    reference, _ = hand_loop(base_model, in_sampler_order(examples, sampler))
    assert max_rel_diff(model, reference) < 1e-6
    assert max_rel_diff(model, base_model) > 1e-3

    accelerator = fresh_accelerator()
    other_rank = StreamBatchSampler(stream_column(examples), MICRO, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="built for rank 1 of 2, but this is process 0 of 1"):
        prepare_stream_loader(accelerator, torch.utils.data.DataLoader(examples, batch_sampler=other_rank))
