"""MLFOPFolding in Lightning's automatic optimization against a hand-written loop with fold() (CPU)."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

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
from mlfop.integrations.accelerate import loss_tokens
from mlfop.integrations.lightning import MLFOPFolding

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_module.py"


class LitLlama(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.norms: list[float] = []
        self.seen_keys: set[str] = set()

    def training_step(self, batch, batch_idx):
        self.seen_keys |= set(batch)
        return self.model(**batch).loss

    def on_before_optimizer_step(self, optimizer):  # before Lightning's clipping: the accumulated norm
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    def configure_optimizers(self):
        return mlfop.MLFOPSOAP(self.parameters(), **OPT_KWARGS)


def fit(base_model, examples, max_steps, clip=None, callbacks=(), ckpt_path=None, folding=None, setup=None,
        sampler=None, **kwargs):
    module = LitLlama(copy.deepcopy(base_model))
    if setup is not None:
        setup(module.model)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=ACCUM,
        gradient_clip_val=clip, enable_checkpointing=bool(callbacks), logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[folding or MLFOPFolding(), *callbacks], **kwargs,
    )
    if sampler is None:
        loader = torch.utils.data.DataLoader(examples, batch_size=MICRO, shuffle=False)
    else:
        loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def test_matches_hand_loop_clipping_and_tokens(base_model):
    examples = make_examples(3)
    module, trainer = fit(base_model, examples, max_steps=3)
    reference, norms = hand_loop(base_model, examples, 3)
    assert trainer.global_step == 3
    assert max_rel_diff(module.model, reference) < 1e-6
    assert max_rel_diff(module.model, base_model) > 1e-3  # it trained
    assert module.norms == pytest.approx(norms, rel=1e-6)  # hooks see the accumulated gradient
    assert "stream" not in module.seen_keys  # the callback took the key out before training_step
    optimizer = MLFOPFolding.mlfop_optimizer(trainer)
    assert set(optimizer.diagnostics()["streams"]) == set(STREAMS)
    assert not optimizer.accumulating  # nothing pending after the run

    clip = 0.05
    clipped, _ = fit(base_model, examples, max_steps=3, clip=clip)
    clipped_ref, clipped_norms = hand_loop(base_model, examples, 3, clip=clip)
    assert min(clipped_norms) > 10 * clip  # clipping fires every step
    assert max_rel_diff(clipped.model, clipped_ref) < 1e-6
    assert max_rel_diff(clipped.model, reference) > 1e-4
    assert clipped.norms == pytest.approx(clipped_norms, rel=1e-6)

    folding = MLFOPFolding(tokens=lambda batch: loss_tokens(batch["labels"]))
    by_tokens, _ = fit(base_model, examples, max_steps=3, folding=folding)
    by_tokens_ref, _ = hand_loop(base_model, examples, 3, tokens=True)
    assert max_rel_diff(by_tokens.model, by_tokens_ref) < 1e-6

    bf16, _ = fit(base_model, examples, max_steps=3, precision="bf16-mixed")
    bf16_ref, bf16_norms = hand_loop(base_model, examples, 3, bf16=True)
    assert max_rel_diff(bf16.model, bf16_ref) < 1e-6
    assert max_rel_diff(bf16.model, reference) > 1e-6  # autocast really ran
    assert bf16.norms == pytest.approx(bf16_norms, rel=1e-6)


def test_resume_from_lightning_checkpoint_continues_exactly(base_model, tmp_path):
    examples = make_examples(2)  # one epoch = 2 optimizer steps; 4 steps = 2 epochs
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, save_last=False)
    full, _ = fit(base_model, examples, max_steps=4, callbacks=[checkpoint])
    reference, _ = hand_loop(base_model, examples, 4)
    assert max_rel_diff(full.model, reference) < 1e-6
    saved = sorted(tmp_path.glob("*step=2*.ckpt"))
    assert saved, sorted(p.name for p in tmp_path.iterdir())
    resumed, trainer = fit(base_model, examples, max_steps=4, ckpt_path=str(saved[0]))
    assert trainer.global_step == 4
    assert max_rel_diff(resumed.model, full.model) < 1e-6
    state = torch.load(saved[0], map_location="cpu", weights_only=True)["state_dict"]
    moved = max(float((p.detach() - state[n]).norm() / state[n].norm()) for n, p in resumed.named_parameters())
    assert moved > 1e-3  # the resumed steps moved the weights (a fresh SOAP would only initialise)


def test_missing_stream_key_is_a_clear_error(base_model):
    examples = [{k: v for k, v in e.items() if k != "stream"} for e in make_examples(1)]
    with pytest.raises(KeyError, match="no 'stream' key"):
        fit(base_model, examples, max_steps=1)
    with pytest.raises(KeyError, match="no 'modality' key"):
        fit(base_model, make_examples(1), max_steps=1, folding=MLFOPFolding(stream_key="modality"))


def test_example_script_runs(tmp_path):
    assert "trained" in run_example(EXAMPLE, tmp_path)


def test_skipped_step_still_checkpoints(base_model, tmp_path):
    """A step refused for a non-finite gradient ends its accumulation: the next save and step work."""

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        _, trainer = fit(base_model, make_examples(3), max_steps=3, callbacks=[checkpoint],
                         setup=poison_second_step)
    assert MLFOPFolding.mlfop_optimizer(trainer).skipped_steps == 1
    assert trainer.global_step == 3 and sorted(tmp_path.glob("*step=2*.ckpt"))


def test_core_does_not_import_the_engines():
    code = (
        "import sys, mlfop; "
        "assert not {'lightning', 'pytorch_lightning', 'accelerate', 'mlfop.integrations.lightning', "
        "'mlfop.integrations.accelerate'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mixed_dataset_through_the_sampler_matches_hand_loop(base_model):
    """Two epochs of a mixed dataset: Lightning calls the sampler's set_epoch, the hand loop follows it."""
    examples = mixed_examples(24)
    sampler = StreamBatchSampler(stream_column(examples), MICRO, accumulation_steps=ACCUM, seed=5)
    module, trainer = fit(base_model, examples, max_steps=2 * len(sampler) // ACCUM, sampler=sampler)
    assert sampler.epoch == 1
    order = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order += in_sampler_order(examples, sampler)
    reference, _ = hand_loop(base_model, order)
    assert max_rel_diff(module.model, reference) < 1e-6
    assert max_rel_diff(module.model, base_model) > 1e-3
