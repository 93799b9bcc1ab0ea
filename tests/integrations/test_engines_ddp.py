"""accelerate and Lightning under DDP: 2 gloo ranks on CPU (spawned once by :mod:`rank_spawn`).

Each rank runs the loop that the README documents for its engine, with ``MLFOPSOAP`` folding
the streams "image" and "text" of a mixed dataset that :class:`mlfop.data.StreamBatchSampler`
batches into single-stream micro-batches:

- accelerate: ``Accelerator(gradient_accumulation_steps=ACCUM)``, ``prepare_stream_loader``,
  ``StreamFolding``, ``with accelerator.accumulate(model)`` (DDP syncs the last micro-batch);
- Lightning: ``Trainer(strategy=DDPStrategy(process_group_backend="gloo"), devices=WORLD,
  accumulate_grad_batches=ACCUM, use_distributed_sampler=False)`` with the ``MLFOPFolding``
  callback, the loader built in ``train_dataloader()``. Lightning sees ``LOCAL_RANK`` in the
  environment, so it creates no processes and joins the process group that rank_spawn made.

The ranks must end with the same parameters (bitwise) and match one process that folds both
ranks' micro-batches of each step (the same global batch) with the same loss normalisation,
within a small multiple of the rounding floor: the spread of single-process runs that differ
only in the order of their folds (as in ``tests/distributed/test_ddp_folding.py``).

Both engines run in one spawn (a spawn and Lightning's start cost a few seconds each).
"""

from __future__ import annotations

import types
import warnings

import lightning as L
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from lightning.pytorch.strategies import DDPStrategy
from rank_spawn import run_ranks, scenario_results
from torch import nn

import mlfop
from mlfop.data import StreamBatchSampler, stream_column
from mlfop.integrations.accelerate import StreamFolding, prepare_stream_loader
from mlfop.integrations.lightning import MLFOPFolding

STREAMS = ("image", "text")
WORLD, MICRO, ACCUM, STEPS = 2, 4, 4, 4
# 10 global micro-batches of image and 6 of text (MICRO * WORLD = 8 examples each): 16 per rank,
# exactly STEPS windows of ACCUM, each with both streams (the sampler keeps 10:6 in every window).
COUNTS = {"image": 80, "text": 48}
SEED = 3


def _examples() -> list[dict]:
    """A mixed dataset: the streams in random order; the two streams pull the model apart."""
    gen = torch.Generator().manual_seed(7)
    streams = [s for s, n in COUNTS.items() for _ in range(n)]
    streams = [streams[i] for i in torch.randperm(len(streams), generator=gen).tolist()]
    examples = []
    for stream in streams:
        x = torch.randn(8, generator=gen)
        shift = 1.0 if stream == "image" else -1.0
        examples.append({"x": x, "y": shift * x.flip(0) + 0.1 * torch.randn(8, generator=gen), "stream": stream})
    return examples


class Net(nn.Module):
    """Square 8x8 weights (see test_ddp_folding's ``_model``: well-conditioned Kronecker factors,
    so fp32 rounding stays at the 1e-5 level of the displacement). ``net(x=..., y=...).loss`` is
    the micro-batch's mean squared error, as ``model(**batch).loss`` of the documented loops."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8, bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(loss=(self.body(x) - y).pow(2).mean())


class RecordingSOAP(mlfop.MLFOPSOAP):
    """MLFOPSOAP that remembers the streams it folded."""

    def __init__(self, params) -> None:
        # precondition_frequency=2: the eigenbases are refreshed within the STEPS steps. The
        # default noise shrinkage: each rank's synced micro-batch is recorded before DDP's average.
        super().__init__(params, streams=STREAMS, lr=1e-2, precondition_frequency=2)
        self.folded: list[str] = []

    def fold(self, stream=None, tokens=None):
        self.folded.append(stream)
        super().fold(stream, tokens=tokens)


def _sampler(**ranks) -> StreamBatchSampler:
    return StreamBatchSampler(stream_column(_examples()), MICRO, accumulation_steps=ACCUM, seed=SEED,
                              drop_last=True, **ranks)


def _result(model: nn.Module, optimizer: RecordingSOAP, sampler: StreamBatchSampler) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "folded": optimizer.folded,
        "micro_batches": sampler.micro_batches(),
        "ranks": (sampler.num_replicas, sampler.rank),
        "steps": {float(state["step"]) for state in optimizer.state.values()},
    }


# ------------------------------------------------------------------------------ the ranks


def _accelerate(rank: int) -> dict:
    """README "With accelerate", on this rank."""
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton
    GradientState._reset_state()
    examples = _examples()
    model = Net()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    assert (accelerator.num_processes, accelerator.process_index) == (WORLD, rank)
    sampler = StreamBatchSampler(stream_column(examples), MICRO, accumulation_steps=ACCUM, seed=SEED, drop_last=True)
    loader = prepare_stream_loader(accelerator, torch.utils.data.DataLoader(examples, batch_sampler=sampler))
    model, optimizer = accelerator.prepare(model, RecordingSOAP(model.parameters()))
    assert isinstance(model, nn.parallel.DistributedDataParallel), type(model)
    folding = StreamFolding(optimizer)
    for batch in loader:
        with accelerator.accumulate(model):
            stream = folding.pop_stream(batch)
            accelerator.backward(model(**batch).loss)
            folding.fold(stream)
            optimizer.step()
            optimizer.zero_grad()
    return _result(accelerator.unwrap_model(model), folding.optimizer, sampler)


class LitNet(L.LightningModule):
    """README "With Lightning": training_step unchanged, the loader built after the ranks exist."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.sampler: StreamBatchSampler | None = None

    def on_train_start(self) -> None:  # (after fit, Lightning's teardown unwraps the model)
        self.wrapper = type(self.trainer.strategy.model)

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return RecordingSOAP(self.parameters())

    def train_dataloader(self):
        examples = _examples()
        self.sampler = StreamBatchSampler(stream_column(examples), MICRO, accumulation_steps=ACCUM, seed=SEED,
                                          drop_last=True)
        return torch.utils.data.DataLoader(examples, batch_sampler=self.sampler)


def _lightning(rank: int) -> dict:
    module = LitNet()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=DDPStrategy(process_group_backend="gloo"), max_epochs=1,
        accumulate_grad_batches=ACCUM, use_distributed_sampler=False, callbacks=[MLFOPFolding()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module)
    assert (trainer.world_size, trainer.global_rank, trainer.global_step) == (WORLD, rank, STEPS)
    assert module.wrapper is nn.parallel.DistributedDataParallel, module.wrapper
    return _result(module.net, MLFOPFolding.mlfop_optimizer(trainer), module.sampler)


SCENARIOS = {"accelerate": _accelerate, "lightning": _lightning}


# ------------------------------------------------------------------------ one process


def _single_process(per_rank: list[list], order: list[int]) -> list[torch.Tensor]:
    """The reference: each step's WORLD * ACCUM micro-batches in one process, folded in ``order``
    (positions in rank-major order). The loss is the micro-batch mean over ACCUM * WORLD: what
    the engines' division by ACCUM and DDP's average over the ranks make of it."""
    examples = _examples()
    model = Net()
    opt = RecordingSOAP(model.parameters())
    for step in range(STEPS):
        micro = [mb for rank in per_rank for mb in rank[step * ACCUM : (step + 1) * ACCUM]]
        for g in order:
            stream, indices = micro[g]
            x = torch.stack([examples[i]["x"] for i in indices])
            y = torch.stack([examples[i]["y"] for i in indices])
            (model(x=x, y=y).loss / len(micro)).backward()
            opt.fold(stream)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _relative(a, b, start) -> float:
    """||a - b|| relative to b's displacement from ``start`` (not to ||b||, which the initial
    weights dominate)."""
    return float((_flat(a) - _flat(b)).norm() / (_flat(b) - _flat(start)).norm())


# ------------------------------------------------------------------------------- the tests

_RANK_MAJOR = list(range(WORLD * ACCUM))  # rank 0's micro-batches first, as the DDP split
_INTERLEAVED = [g for j in range(ACCUM) for g in range(j, WORLD * ACCUM, ACCUM)]
_REVERSED = _RANK_MAJOR[::-1]
# How far an engine's run may be from the single process, in units of the rounding floor (as in
# test_ddp_folding: the DDP run sums each stream in yet another order, so a few floors, not 10).
_FLOORS = 10.0
# A wrong step is orders of magnitude further: each rank stepping on its own micro-batches only
# (no average across the ranks) is checked to be at least this many floors away.
_WRONG_FLOORS = 1e3


def test_accelerate_and_lightning_on_two_ranks_match_one_process(tmp_path):
    ranks = run_ranks(__name__, list(SCENARIOS), tmp_path)
    sampler = _sampler(num_replicas=WORLD, rank=0)
    per_rank = [sampler.micro_batches(), _sampler(num_replicas=WORLD, rank=1).micro_batches()]
    assert [len(r) for r in per_rank] == [STEPS * ACCUM] * WORLD
    for step in range(STEPS):  # every step folds both streams
        assert {s for s, _ in per_rank[0][step * ACCUM : (step + 1) * ACCUM]} == set(STREAMS)
    streams = [s for s, _ in per_rank[0]]

    start = [p.detach().clone() for p in Net().parameters()]
    references = [_single_process(per_rank, order) for order in (_RANK_MAJOR, _INTERLEAVED, _REVERSED)]
    floor = max(_relative(references[i], references[j], start) for i in range(3) for j in range(i + 1, 3))
    # What a rank would take without DDP's average: its own micro-batches only.
    rank_local = _single_process([per_rank[0]], list(range(ACCUM)))
    wrong = _relative(rank_local, references[0], start)
    print(f"\nrounding floor {floor:.2e}; rank 0 alone (no average) {wrong:.2e} (of the displacement)")
    assert wrong >= _WRONG_FLOORS * floor, f"the test cannot tell a wrong step: floor {floor:.2e}, wrong {wrong:.2e}"

    for engine in SCENARIOS:
        rank0, rank1 = scenario_results(ranks, engine)
        assert [rank0["ranks"], rank1["ranks"]] == [(WORLD, 0), (WORLD, 1)], f"{engine}: the sampler's ranks"
        # The ranks iterated their own shares of the sampler, untouched by the engine.
        assert [rank0["micro_batches"], rank1["micro_batches"]] == per_rank, f"{engine}: the sampler's micro-batches"
        assert rank0["folded"] == rank1["folded"] == streams, f"{engine}: the folded streams"
        assert rank0["steps"] == rank1["steps"] == {float(STEPS - 1)}, f"{engine}: steps {rank0['steps']}"
        for a, b in zip(rank0["params"], rank1["params"]):
            assert torch.equal(a, b), f"{engine}: the ranks' parameters differ"
        distance = _relative(rank0["params"], references[0], start)
        print(f"{engine}: two ranks vs one process {distance:.2e} (of the displacement), {distance / floor:.2f} floors")
        assert distance <= max(_FLOORS * floor, 1e-6), f"{engine}: floor {floor:.2e}, distance {distance:.2e}"
