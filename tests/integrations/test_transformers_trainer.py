"""MLFOPTrainer against a hand-written accumulation loop with fold() (tiny random Llama, CPU)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import accelerate  # noqa: F401  (Trainer needs it; the `test` extra installs it)
import pytest
import torch
from transformers import TrainingArguments

import mlfop
from tiny_llama import (
    ACCUM,
    MICRO,
    SEQ,
    STREAMS,
    in_sampler_order,
    make_examples,
    mixed_examples,
    poison_second_step,
    run_example,
)
from mlfop.integrations.transformers import MLFOPTrainer, StreamCollator

LR, WD, BETAS, EPS = 3e-2, 0.1, (0.9, 0.95), 1e-8
OPT_KWARGS = {"streams": STREAMS, "precondition_frequency": 1}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformers_trainer.py"


def training_args(tmp_path: Path, steps: int, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=steps, learning_rate=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_epsilon=EPS, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        train_sampling_strategy="sequential", dataloader_drop_last=True, remove_unused_columns=False,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def run_trainer(base_model, tmp_path, steps=2, examples=None, resume=None, group_by_stream=False, **overrides):
    """MLFOPTrainer on ``examples``; by default in their order (already single-stream micro-batches)."""
    model = copy.deepcopy(base_model)
    trainer = MLFOPTrainer(
        model=model, args=training_args(tmp_path, steps, **overrides),
        train_dataset=examples if examples is not None else make_examples(steps),
        group_by_stream=group_by_stream, optimizer_kwargs=OPT_KWARGS,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def hand_loop(base_model, steps=2, max_grad_norm=0.0, untagged=False, bf16=False, examples=None):
    """The loop Trainer runs, written out: token-sum loss / step tokens, fold, clip, step.

    ``examples`` come in micro-batches of MICRO, in order (default: ``make_examples(steps)``).
    """
    model = copy.deepcopy(base_model)
    named = list(model.named_parameters())
    groups = [  # Trainer's groups: no decay for biases and norms (the 1-D norm weights here)
        {"params": [p for n, p in named if "norm" not in n], "weight_decay": WD},
        {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0},
    ]
    kwargs = {**OPT_KWARGS, "streams": None} if untagged else OPT_KWARGS
    opt = mlfop.MLFOPSOAP(groups, lr=LR, betas=BETAS, eps=EPS, **kwargs)
    examples = make_examples(steps) if examples is None else examples
    batches = [examples[i : i + MICRO] for i in range(0, len(examples), MICRO)]
    norms = []
    for step in range(steps):
        micro = batches[step * ACCUM : (step + 1) * ACCUM]
        labels = [torch.stack([e["labels"] for e in mb]) for mb in micro]
        total = sum(int(lab[:, 1:].ne(-100).sum()) for lab in labels)
        for mb, lab in zip(micro, labels):
            ids = torch.stack([e["input_ids"] for e in mb])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=lab, num_items_in_batch=torch.tensor(total)).loss
            loss.backward()
            opt.fold(None if untagged else mb[0]["stream"], tokens=int(lab[:, 1:].ne(-100).sum()))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        norms.append(float(norm))
        opt.step()
        opt.zero_grad()
    return model, norms


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        worst = max(worst, float((p.detach() - q.detach()).norm() / q.detach().norm().clamp_min(1e-30)))
    return worst


def logged_grad_norms(trainer) -> list[float]:
    return [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]


def test_matches_hand_loop_and_logs_grad_norm(base_model, tmp_path):
    trainer, model = run_trainer(base_model, tmp_path, steps=3)
    reference, norms = hand_loop(base_model, steps=3)
    assert max_rel_diff(model, reference) < 1e-6
    assert max_rel_diff(model, base_model) > 1e-3  # it trained
    logged = logged_grad_norms(trainer)
    assert len(logged) == 3
    assert logged == pytest.approx(norms, rel=1e-6)
    opt = trainer.mlfop_optimizer()
    assert isinstance(opt, mlfop.MLFOPSOAP)
    decays = sorted(group["weight_decay"] for group in opt.param_groups)
    assert decays == [0.0, WD]  # TrainingArguments.weight_decay, not overridden
    assert opt.param_groups[0]["betas"] == BETAS and opt.param_groups[0]["lr"] == LR
    assert set(opt.diagnostics()["streams"]) == set(STREAMS)  # the last step combined both streams


def test_integer_stream_ids_and_remove_unused_columns(base_model, tmp_path):
    """Integer ids map to the optimizer's streams; the column survives remove_unused_columns=True."""
    _, model = run_trainer(base_model, tmp_path, steps=3, examples=make_examples(3, stream_as_id=True),
                           remove_unused_columns=True)
    reference, _ = hand_loop(base_model, steps=3)
    assert max_rel_diff(model, reference) < 1e-6


def test_clipping_takes_effect(base_model, tmp_path):
    clip = 0.05
    trainer, clipped = run_trainer(base_model, tmp_path, steps=3, max_grad_norm=clip)
    unclipped_ref, _ = hand_loop(base_model, steps=3)
    reference, norms = hand_loop(base_model, steps=3, max_grad_norm=clip)
    assert min(norms) > 10 * clip  # clipping really rescales every step
    assert max_rel_diff(clipped, reference) < 1e-6
    assert max_rel_diff(clipped, unclipped_ref) > 1e-4
    assert logged_grad_norms(trainer) == pytest.approx(norms, rel=1e-6)  # the pre-clip norm


def test_resume_from_checkpoint_continues_exactly(base_model, tmp_path):
    full, full_model = run_trainer(base_model, tmp_path / "full", steps=4)
    first, _ = run_trainer(base_model, tmp_path / "cut", steps=4, save_strategy="steps", save_steps=2,
                           examples=make_examples(4))
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    resumed, resumed_model = run_trainer(base_model, tmp_path / "cut", steps=4, resume=str(checkpoint))
    assert resumed.state.global_step == 4
    assert max_rel_diff(resumed_model, full_model) < 1e-6
    # The resumed steps did move the checkpoint's parameters (a fresh optimizer would not: SOAP's first
    # call only sets up bases).
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    moved = max(
        float((p.detach() - saved[n]).norm() / saved[n].norm())
        for n, p in resumed_model.named_parameters()
        if n in saved
    )
    assert moved > 1e-3


def test_missing_stream_column_is_a_clear_error(base_model, tmp_path):
    examples = [{k: v for k, v in e.items() if k != "stream"} for e in make_examples(2)]
    with pytest.raises(KeyError, match="no 'stream' column"):
        run_trainer(base_model, tmp_path, examples=examples)


def test_mixed_micro_batch_and_owned_kwargs_are_refused(base_model, tmp_path):
    collate = StreamCollator()
    examples = make_examples(1)
    batch = collate(examples[:2])
    assert batch["stream"] == "image" and batch["input_ids"].shape == (2, SEQ)
    assert collate(examples[1:3])["stream"] == ["image", "text"]  # kept for evaluation
    with pytest.raises(ValueError, match="mixes the streams"):  # refused in training
        run_trainer(base_model, tmp_path, examples=make_examples(2), per_device_train_batch_size=3)
    trainer, _ = run_trainer(base_model, tmp_path, steps=1, examples=make_examples(1), eval_strategy="no")
    assert math.isfinite(trainer.evaluate(eval_dataset=make_examples(1))["eval_loss"])  # mixed eval batches
    with pytest.raises(ValueError, match="weight_decay"):
        MLFOPTrainer(model=copy.deepcopy(base_model), args=training_args(tmp_path, 1),
                     train_dataset=examples, optimizer_kwargs={"weight_decay": 0.5})


def test_example_script_runs(tmp_path):
    assert "trained" in run_example(EXAMPLE, tmp_path)


def test_skipped_step_still_checkpoints(base_model, tmp_path):
    """A step refused for a non-finite gradient ends its accumulation: the next save and step work."""
    model = copy.deepcopy(base_model)

    poison_second_step(model)
    trainer = MLFOPTrainer(model=model, args=training_args(tmp_path, 3, save_strategy="steps", save_steps=1),
                           train_dataset=make_examples(3), optimizer_kwargs=OPT_KWARGS)
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        trainer.train()
    assert trainer.mlfop_optimizer().skipped_steps == 1
    assert (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").exists()
    assert trainer.state.global_step == 3


def test_untagged_run_alternates_sub_batches(base_model, tmp_path):
    """stream_column=None: no column is read; micro-batches alternate between two sub-batch streams."""
    examples = [{k: v for k, v in e.items() if k != "stream"} for e in make_examples(3)]
    trainer = MLFOPTrainer(model=copy.deepcopy(base_model), args=training_args(tmp_path, 3), train_dataset=examples,
                           stream_column=None, optimizer_kwargs={"precondition_frequency": 1})
    trainer.train()
    reference, _ = hand_loop(base_model, steps=3, untagged=True)
    assert max_rel_diff(trainer.model, reference) < 1e-6
    assert trainer.mlfop_optimizer().streams == ("even", "odd")


def test_core_does_not_import_transformers():
    code = (
        "import sys, mlfop; "
        "assert 'transformers' not in sys.modules and 'mlfop.integrations.transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bf16_autocast_matches_hand_loop(base_model, tmp_path):
    """TrainingArguments(bf16=True) on CPU: autocast forward, fp32 parameters and folds."""
    trainer, model = run_trainer(base_model, tmp_path, steps=3, bf16=True)
    reference, norms = hand_loop(base_model, steps=3, bf16=True)
    fp32, _ = hand_loop(base_model, steps=3)
    assert max_rel_diff(model, reference) < 1e-6
    assert max_rel_diff(model, fp32) > 1e-6  # autocast really ran
    assert logged_grad_norms(trainer) == pytest.approx(norms, rel=1e-6)


def test_mixed_dataset_is_batched_by_stream_and_resumes(base_model, tmp_path):
    """A dataset with mixed streams: the train dataloader groups it with StreamBatchSampler (from
    TrainingArguments), equal to the hand loop over the sampler's micro-batches, also on resume."""
    examples = mixed_examples(44)
    random_order = {"train_sampling_strategy": "random", "seed": 3}
    trainer, model = run_trainer(base_model, tmp_path / "full", steps=4, examples=examples, group_by_stream=True,
                                 **random_order)
    sampler = trainer.stream_batch_sampler()
    assert (sampler.micro_batch_size, sampler.accumulation_steps, sampler.seed, sampler.shuffle) == (MICRO, ACCUM, 3, True)
    assert len(trainer.get_train_dataloader()) == len(sampler)
    reference, _ = hand_loop(base_model, steps=4, examples=in_sampler_order(examples, sampler))
    assert max_rel_diff(model, reference) < 1e-6
    assert max_rel_diff(model, base_model) > 1e-3

    run_trainer(base_model, tmp_path / "cut", steps=4, examples=examples, group_by_stream=True, save_strategy="steps",
                save_steps=2, **random_order)
    _, resumed = run_trainer(base_model, tmp_path / "cut", steps=4, examples=examples, group_by_stream=True,
                             resume=str(tmp_path / "cut" / "out" / "checkpoint-2"), **random_order)
    assert max_rel_diff(resumed, model) < 1e-6

    with pytest.raises(ValueError, match="mixes the streams"):  # the old behaviour, refused on mixed data
        run_trainer(base_model, tmp_path / "old", examples=examples, group_by_stream=False)
    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length'"):
        run_trainer(base_model, tmp_path / "length", examples=examples, group_by_stream=True,
                    train_sampling_strategy="group_by_length")
